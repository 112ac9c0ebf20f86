"""One size parser and one Hub-id rule (issue 17, item 6), checked in the source and in behaviour.

The source check reads every project module with ``ast`` (as tests/test_layering.py does):
a second ``def parse_size``, a regular expression spelling ``owner/name``, or a call of
huggingface_hub's ``validate_repo_id`` outside :mod:`checkpoints.refs` is a second rule.
"""

from __future__ import annotations

import ast

import pytest

from checkpoints.errors import WeightsmithError
from checkpoints.hub import push_folder
from checkpoints.refs import is_hub_id
from checkpoints.sizes import parse_size
from test_layering import ROOT, project_modules

SIZE_PARSER = "checkpoints.sizes"
HUB_ID_RULE = "checkpoints.refs"


def second_rules(modules: dict) -> list[str]:
    """Places outside the two homes that define a size parser or decide what a Hub id is."""
    found = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and "parse_size" in node.name \
                    and name != SIZE_PARSER:
                found.append(f"{name}:{node.lineno}: def {node.name}")
            if name == HUB_ID_RULE:
                continue
            if isinstance(node, ast.Call):
                f = node.func
                called = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
                if called == "validate_repo_id":
                    found.append(f"{name}:{node.lineno}: validate_repo_id")
                # a pattern of the shape "<name chars>/<name chars>" passed to re.*
                if (called in ("compile", "match", "fullmatch", "search") and node.args
                        and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
                        and "]/[" in node.args[0].value.replace("*", "").replace("+", "")):
                    found.append(f"{name}:{node.lineno}: owner/name pattern {node.args[0].value!r}")
    return sorted(found)


def test_one_size_parser_and_one_hub_id_rule_in_the_source():
    assert second_rules(project_modules(ROOT)) == []


def test_the_source_check_sees_a_second_rule(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "__init__.py").write_text("")
    (tmp_path / "checkpoints" / "other.py").write_text(
        "import re\nfrom huggingface_hub.utils import validate_repo_id\n"
        "HUB = re.compile(r'^[\\w.-]+/[\\w.-]+$')\n"
        "def parse_size_decimal(s):\n    validate_repo_id(s)\n")
    assert second_rules(project_modules(tmp_path)) == [
        "checkpoints.other:3: owner/name pattern '^[\\\\w.-]+/[\\\\w.-]+$'",
        "checkpoints.other:4: def parse_size_decimal",
        "checkpoints.other:5: validate_repo_id",
    ]


def test_push_asks_the_one_hub_id_rule(tmp_path):
    # A push target may leave out its owner (the token owner's namespace); a model reference may not.
    assert is_hub_id("model", owner_optional=True) and not is_hub_id("model")
    assert is_hub_id("alice/model", owner_optional=True) and is_hub_id("alice/model")
    for bad in ("alice/bad name", "alice/x--y", "alice/x.git", "a/b/c", "-model", "m" * 97):
        assert not is_hub_id(bad) and not is_hub_id(bad, owner_optional=True), bad
        with pytest.raises(WeightsmithError, match="not a valid Hub repo id"):  # before any network
            push_folder(tmp_path, bad, token="hf_" + "x" * 34)


def test_size_units_decimal_and_binary():
    # One parser, one meaning: "GB" is decimal and "GiB" binary everywhere (CLI, app, workspace quota).
    assert parse_size("2GB") == 2 * 10**9 and parse_size("2GiB") == 2 * 2**30
    assert parse_size("2GB") != parse_size("2GiB")
