"""The CLI: info output, exit status 2 with one line and no traceback on bad input."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import cli
from checkpoints import commands as checkpoint_commands
from cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_info_json(tiny_gpt2_dir, capsys):
    assert main(["info", str(tiny_gpt2_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["architecture"] == "gpt2" and info["layers"] == 4
    assert info["parameters"] == 57024 and info["dtype"] == "float32"
    assert info["files"] == ["model.safetensors"]
    assert info["name"] == tiny_gpt2_dir.name  # a public name, never the path


def test_bad_input_exits_2_with_one_line(tmp_path):
    bad = tmp_path / "broken"
    bad.mkdir()
    (bad / "config.json").write_text('{"model_type": "llama", "num_hidden_layers": 2}')
    (bad / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    proc = subprocess.run([sys.executable, "-m", "cli", "info", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("weightsmith: error: model.safetensors: corrupt safetensors header")
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_help_lists_foundation_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("demo-model", "info", "serve"):
        assert cmd in out


def test_console_script_is_the_top_level_cli(tmp_path):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["scripts"]["weightsmith"] == "cli:run"
    assert "cli" in project["tool"]["setuptools"]["py-modules"]  # packaged, not only found in the checkout
    # The installed script runs it, from outside the checkout too (the venv's own, not a stale egg-info).
    script = Path(sys.executable).parent / "weightsmith"
    assert "from cli import run" in script.read_text()
    proc = subprocess.run([sys.executable, str(script), "--help"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0 and "serve" in proc.stdout, proc.stderr


def test_serve_is_registered_by_the_cli_not_by_checkpoints():
    def commands(register) -> set[str]:
        sub = argparse.ArgumentParser().add_subparsers()
        register(sub)
        return set(sub.choices)

    assert commands(checkpoint_commands.register) == {"demo-model", "info"}
    every = set(cli.build_parser()._subparsers._group_actions[0].choices)  # noqa: SLF001 - argparse has no API
    assert {"serve", "merge", "mix-adapters", "edit", "push", "export-gguf"} <= every
    assert "serve" in commands(cli.register_serve)


def test_serve_hands_its_flags_to_the_app(capsys):
    # Bad flags stop in the app's serve (before anything launches) and come out as the CLI's one line.
    assert main(["serve", "--queue-size", "0"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["weightsmith: error: --queue-size 0: must be at least 1"]
    assert main(["serve", "--max-file-size", "lots"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("weightsmith: error: --max-file-size") and "lots" in err[0]
