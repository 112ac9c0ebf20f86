"""The one model-card builder: front matter the Hub accepts, a body that says what was done, no local paths."""

from __future__ import annotations


import pytest
from huggingface_hub import ModelCard

from checkpoints.cards import (
    LOCAL_LOAD_HINT,
    CardInfo,
    build_card,
    is_hub_id,
    load_card,
    scrub_local_paths,
    set_card_repo,
    write_card,
)
from checkpoints.errors import WeightsmithError

DEMO_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def _meta(card: ModelCard) -> dict:
    return ModelCard(str(card)).data.to_dict()  # re-parsed from text, as the Hub reads it


def test_merge_card_front_matter_and_body(tmp_path):
    local = tmp_path / "models" / "ft-math"
    local.mkdir(parents=True)
    recipe = f"merge_method: ties\nbase_model: {DEMO_ID}\nmodels:\n  - model: {local}\n  - model: org/ft-code\n"
    card = build_card(CardInfo(
        title="math-code", relation="merge", base_models=[DEMO_ID, str(local), "org/ft-code"],
        summary="A TIES merge.", tags=["lines"], recipe_yaml=recipe, scores={"ppl": 9.87654, "acc": {"a": 1}},
        license="apache-2.0"))
    meta = _meta(card)
    assert meta["base_model"] == [DEMO_ID, "org/ft-code"]  # the local folder is not a Hub id
    assert meta["base_model_relation"] == "merge"
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert meta["tags"] == ["weightsmith", "merge", "lines"]
    assert meta["license"] == "apache-2.0"
    text = str(card)
    assert str(tmp_path) not in text and "/models/" not in text
    assert "- `ft-math` (a local model, not on the Hub)" in text
    assert f"- [{DEMO_ID}](https://huggingface.co/{DEMO_ID})" in text
    assert "  - model: ft-math\n  - model: org/ft-code" in text  # recipe kept, path made a name
    assert "| ppl | 9.877 |" in text and '| acc | {"a": 1} |' in text
    assert f'from_pretrained("{LOCAL_LOAD_HINT}")' in text
    assert 'from_pretrained("me/math-code")' in str(build_card(CardInfo("math-code", "merge", [DEMO_ID], "x"),
                                                                 repo_id="me/math-code"))


def test_single_base_is_a_string_and_local_only_bases_leave_front_matter_out(tmp_path):
    adapter = _meta(build_card(CardInfo("a", "adapter", [DEMO_ID], "LoRA.", library_name="peft")))
    assert adapter["base_model"] == DEMO_ID and adapter["base_model_relation"] == "adapter"
    assert adapter["tags"] == ["weightsmith", "lora"] and adapter["library_name"] == "peft"

    folder = tmp_path / "my-base"
    folder.mkdir()
    card = build_card(CardInfo("edited", "finetune", [str(folder)], "Edited one fact.",
                               edit_log=[{"prompt": "The capital of France is", "subject": "France",
                                          "target_new": "Rome", "layer": 4, "method": "ROME"}]))
    meta = _meta(card)
    assert "base_model" not in meta and "base_model_relation" not in meta
    assert meta["tags"] == ["weightsmith", "rome"]
    text = str(card)
    assert "`my-base` (a local model, not on the Hub)" in text
    assert "| 1 | The capital of France is | France | Rome | 4 |" in text
    assert 'from_pretrained("path/to/my-base")' not in text  # transformers card: loads itself
    peft_local = str(build_card(CardInfo("a", "adapter", [str(folder)], "x", library_name="peft")))
    assert 'AutoModelForCausalLM.from_pretrained("path/to/my-base")' in peft_local


def test_demo_reference_becomes_its_hub_id():
    assert _meta(build_card(CardInfo("m", "finetune", ["demo"], "x")))["base_model"] == DEMO_ID


def test_free_text_is_scrubbed_of_paths(tmp_path):
    card = str(build_card(CardInfo(
        title=str(tmp_path / "out" / "my-merge"), relation="merge", base_models=[],
        summary=f"Made from {tmp_path}/a and ./b/c; see https://huggingface.co/{DEMO_ID}.",
        extra_sections={"Notes": "Cache at ~/.cache/x, ratio 1/2 and a/b."},
        edit_log=[{"prompt": f"x | {tmp_path}", "subject": "s", "target": "t", "layer": 1}])))
    assert str(tmp_path) not in card and "~/" not in card and "./b" not in card
    assert card.count("# my-merge") == 1
    assert f"https://huggingface.co/{DEMO_ID}" in card and "ratio 1/2 and a/b" in card
    assert "x \\| " in card  # table cells escape pipes


def test_scrub_local_paths_examples():
    assert scrub_local_paths("/root/.cache/models/SmolLM2 and C:\\Users\\me\\m.") == "SmolLM2 and m."
    assert scrub_local_paths("http://127.0.0.1:8000/a/b stays") == "http://127.0.0.1:8000/a/b stays"
    assert scrub_local_paths("org/model stays") == "org/model stays"


def test_is_hub_id():
    assert is_hub_id(DEMO_ID) and is_hub_id("a/b.c-d_e")
    for bad in ("local-folder", "/abs/path", "a/b/c", "a--b/c", "a/..", "a/b.git", ""):
        assert not is_hub_id(bad), bad


def test_write_load_and_point_card_at_repo(tmp_path):
    path = write_card(tmp_path, CardInfo("m", "merge", [DEMO_ID, "org/x"], "Merged."))
    assert path == tmp_path / "README.md"
    card = load_card(tmp_path)
    assert card.data.base_model == [DEMO_ID, "org/x"]
    assert set_card_repo(tmp_path, "me/m") is True
    assert 'from_pretrained("me/m")' in path.read_text() and LOCAL_LOAD_HINT not in path.read_text()
    assert set_card_repo(tmp_path, "me/m") is False  # already pointed
    assert [p.name for p in tmp_path.iterdir()] == ["README.md"]  # no temp file left behind


@pytest.mark.parametrize("text, match", [
    (None, "no model card"),
    ("# just a title\n", "no front matter"),
    ("---\nbase_model: my-folder\n---\n# x\n", "base_model 'my-folder' is not a Hub id"),
    ("---\nbase_model: a/b\nbase_model_relation: soup\n---\n# x\n", "base_model_relation 'soup'"),
])
def test_load_card_errors(tmp_path, text, match):
    if text is not None:
        (tmp_path / "README.md").write_text(text)
    with pytest.raises(WeightsmithError, match=match):
        load_card(tmp_path)
