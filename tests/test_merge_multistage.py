"""Multi-stage recipes (issue 14 item 4): named documents, later stages reading earlier ones.

A two-stage recipe must equal the two merges run by hand; a second run must
reuse the cached stage 1 (and merge it again when stage 1 or its input
changes); undefined stages and cycles are one error line before anything runs;
the final card tells the whole chain; mergekit-multi 0.1.5 gives the same
tensors (skipped without its venv).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from checkpoints.errors import WeightsmithError
from checkpoints.jobs import Cancelled, Job
from cli import main
from merging.engine import run_merge
from merging.multistage import run_recipe
from merging.recipe import MergeRecipe
from test_merge_lora_inputs import MERGEKIT_VENV, make_adapter, max_diff
from test_merge_methods import MID, load

STAGE1 = """name: stage1
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: {w1}}}
  - model: {ft2}
    parameters: {{weight: 0.3}}
dtype: float32
"""
FINAL = """merge_method: linear
models:
  - model: {first}
    parameters: {{weight: 0.6}}
  - model: {ft3}
    parameters: {{weight: 0.4}}
dtype: float32
"""


def two_stage(f: dict[str, Path], *, w1: float = 0.7, first: str = "stage1", final_first: bool = True) -> str:
    """Stage 1 (named) and the unnamed final stage reading it; the final may come first (any order)."""
    docs = [STAGE1.format(w1=w1, **f), FINAL.format(first=first, **f)]
    return "---\n".join(reversed(docs) if final_first else docs)


def test_two_stages_equal_the_stages_run_by_hand(tmp_path, tiny_llama_family):
    f = tiny_llama_family
    run = run_recipe(two_stage(f), tmp_path / "out", intermediate_dir=tmp_path / "inter")
    # by hand: stage 1 into a folder, then the final recipe reading that folder
    run_merge(MergeRecipe.from_yaml(STAGE1.format(w1=0.7, **f).replace("name: stage1\n", "")), tmp_path / "s1")
    run_merge(MergeRecipe.from_yaml(FINAL.format(first=tmp_path / "s1", **f)), tmp_path / "hand")
    out, hand, s1, ft3 = load(tmp_path / "out"), load(tmp_path / "hand"), load(tmp_path / "s1"), load(f["ft3"])
    assert set(out) == set(hand)
    for k in out:
        assert torch.equal(out[k], hand[k]), k
    assert not torch.equal(out[MID], s1[MID]) and not torch.equal(out[MID], ft3[MID])  # both stages acted
    assert [(s.name, s.reused) for s in run.stages] == [("stage1", False), ("final", False)]
    assert load(run.stages[0].folder)[MID].equal(s1[MID])  # the cached intermediate is stage 1's result


def test_second_run_reuses_stage1_and_recomputes_it_when_it_changes(tmp_path, tiny_llama_family):
    f = dict(tiny_llama_family)
    f["ft1"] = Path(shutil.copytree(f["ft1"], tmp_path / "ft1"))  # an input this test may touch
    inter = tmp_path / "inter"
    first = run_recipe(two_stage(f), tmp_path / "a", intermediate_dir=inter)
    cached = first.stages[0].folder / "model.safetensors"
    mtime = cached.stat().st_mtime_ns

    job = Job.recording()
    again = run_recipe(two_stage(f), tmp_path / "b", intermediate_dir=inter, job=job)
    assert again.stages[0].reused and again.stages[0].key == first.stages[0].key
    assert cached.stat().st_mtime_ns == mtime  # not written again
    assert any("stage stage1: reused" in m for m in job.messages)
    assert all(torch.equal(x, y) for x, y in zip(load(tmp_path / "a").values(), load(tmp_path / "b").values()))
    fractions = [fr for fr, _ in job.events if fr is not None]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0  # one monotone job across the stages

    changed = run_recipe(two_stage(f, w1=0.5), tmp_path / "c", intermediate_dir=inter)  # stage 1's recipe changed
    assert not changed.stages[0].reused and changed.stages[0].key != first.stages[0].key
    assert not cached.exists()  # the stale result was dropped, one per stage name
    assert not torch.equal(load(tmp_path / "c")[MID], load(tmp_path / "a")[MID])

    weights = f["ft1"] / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # stage 1's input changed
    touched = run_recipe(two_stage(f, w1=0.5), tmp_path / "d", intermediate_dir=inter)
    assert not touched.stages[0].reused and touched.stages[0].key != changed.stages[0].key


@pytest.mark.parametrize("text_of, words", [
    (lambda f: two_stage(f, first="stag1"), "'stag1' is neither a stage of this recipe (stage1) nor a model"),
    (lambda f: STAGE1.format(w1=0.5, **f).replace(f"model: {f['ft2']}", "model: loop") + "---\nname: loop\n"
     + FINAL.format(first="stage1", **f), "the stages stage1 -> loop -> stage1 form a cycle"),
    (lambda f: STAGE1.format(w1=0.5, **f).replace(f"model: {f['ft2']}", "model: stage1"),
     "the stages stage1 -> stage1 form a cycle"),
    (lambda f: two_stage(f) + "---\n" + STAGE1.format(w1=0.2, **f), "two stages are named stage1"),
    (lambda f: two_stage(f) + "---\n" + FINAL.format(first="stage1", **f), "only one document may have no name"),
    (lambda f: "name: ../up\n" + FINAL.format(first="stage1", **f), "name must be letters"),
    (lambda f: two_stage(f).replace("merge_method: linear", "merge_method: nope"), "stage final: unknown merge method"),
])
def test_bad_stage_graphs_are_one_line_before_anything_runs(tmp_path, tiny_llama_family, text_of, words):
    with pytest.raises(WeightsmithError) as err:
        run_recipe(text_of(tiny_llama_family), tmp_path / "out", intermediate_dir=tmp_path / "inter")
    assert words in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / "inter").exists()


def test_card_and_recipe_file_tell_the_whole_chain(tmp_path, tiny_llama_family):
    f = tiny_llama_family
    run_recipe(two_stage(f), tmp_path / "out", intermediate_dir=tmp_path / "inter")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## Merge stages" in card
    assert "multi-stage" in card and str(tmp_path) not in card and "/tmp" not in card
    # every model the chain started from, by its public name
    assert f"1. **stage1**: task_arithmetic of {f['ft1'].name}, {f['ft2'].name} on {f['base'].name}\n" in card
    assert f"2. **final** (this model): linear of stage1, {f['ft3'].name}\n" in card
    # the output's recipe file is the whole recipe, public names, and runs again (same tensors)
    saved = (tmp_path / "out" / "weightsmith_recipe.yml").read_text()
    assert saved.count("---") == 2 and "name: stage1" in saved and str(tmp_path) not in saved
    rerun = saved
    for model in ("base", "ft1", "ft2", "ft3"):
        rerun = rerun.replace(f"model: {f[model].name}\n", f"model: {f[model]}\n")
    again = run_recipe(rerun, tmp_path / "again", intermediate_dir=tmp_path / "inter")
    assert again.stages[0].reused
    assert all(torch.equal(x, y) for x, y in zip(load(tmp_path / "out").values(), load(tmp_path / "again").values()))


def test_chain_bases_join_the_front_matter(tmp_path):
    """Hub ids the chain started from (both sides of model+adapter) become the card's base_model list."""
    from checkpoints.cards import CardInfo, add_card_section, load_card, write_card

    write_card(tmp_path, CardInfo(title="m", relation="merge", base_models=["stage1", "org/c"], summary="s"))
    add_card_section(tmp_path, "Merge stages", "1. ...", base_models=["org/a+org/lora", "local-folder", "org/c"])
    meta = load_card(tmp_path).data.to_dict()
    assert meta["base_model"] == ["org/c", "org/a", "org/lora"] and meta["base_model_relation"] == "merge"


def test_cancel_in_stage_two_leaves_no_output(tmp_path, tiny_llama_family):
    job = Job.recording()
    job.listener = lambda fraction, text: job.cancel() if fraction is not None and fraction > 0.5 else None
    with pytest.raises(Cancelled):
        run_recipe(two_stage(tiny_llama_family), tmp_path / "out", intermediate_dir=tmp_path / "inter", job=job)
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inter"]  # no staging folder left beside the output


def test_cli_runs_a_multistage_recipe(tmp_path, tiny_llama_family, capsys):
    (tmp_path / "stages.yml").write_text(two_stage(tiny_llama_family))
    args = ["merge", str(tmp_path / "stages.yml"), str(tmp_path / "out"), "--intermediate-dir", str(tmp_path / "i")]
    assert main(args) == 0
    assert "stage stage1: merged" in capsys.readouterr().out
    assert main([*args[:2], str(tmp_path / "out2"), *args[3:]]) == 0
    assert "stage stage1: reused" in capsys.readouterr().out
    (tmp_path / "bad.yml").write_text(two_stage(tiny_llama_family, first="stage9"))
    assert main(["merge", str(tmp_path / "bad.yml"), str(tmp_path / "out3")]) == 2
    assert "'stage9' is neither a stage" in capsys.readouterr().err


def test_same_tensors_as_mergekit_multi(tmp_path, tiny_llama_family):
    """Stage 1 and a final stage reading stage1+lora (both features at once), against mergekit-multi."""
    exe = MERGEKIT_VENV / "bin" / "mergekit-multi"
    if not exe.exists():
        pytest.skip(f"mergekit 0.1.5 venv not found at {MERGEKIT_VENV} (bench/merge_vs_mergekit.py makes it)")
    f = tiny_llama_family
    lora = make_adapter(f["base"], tmp_path / "lora", ["q_proj", "o_proj"], seed=11)
    text = two_stage(f, first=f"stage1+{lora}", final_first=False)
    (tmp_path / "stages.yml").write_text(text)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(exe), str(tmp_path / "stages.yml"), "--intermediate-dir", str(tmp_path / "mk-inter"),
                           "--out-path", str(tmp_path / "mk"), "--lora-merge-cache", str(tmp_path / "mk-lora"),
                           "--allow-crimes"], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run_recipe(text, tmp_path / "ws", intermediate_dir=tmp_path / "ws-inter")
    ours, theirs = load(tmp_path / "ws"), load(tmp_path / "mk")
    assert max_diff(ours, theirs) <= 1e-5
    stage1 = next((tmp_path / "ws-inter").glob("*/stage1"))
    assert max_diff(load(stage1), load(tmp_path / "mk-inter" / "stage1")) <= 1e-5
    # non-vacuous: the adapter on stage 1 shows in both outputs
    without = run_recipe(two_stage(f, final_first=False), tmp_path / "plain", intermediate_dir=tmp_path / "ws-inter")
    assert without.stages[0].reused
    assert float((ours[MID] - load(tmp_path / "plain")[MID]).abs().max()) > 1e-3


def test_merge_tab_runs_stages_with_workspace_items(tmp_path, tiny_llama_family):
    """The app: a stage reading stage1+ws:<uploaded adapter>, stages cached in the session's own workspace."""
    import gradio as gr
    from types import SimpleNamespace

    from ui.config import AppConfig
    from ui.workbench import Workbench

    f = tiny_llama_family
    wb = Workbench(AppConfig(workspace_root=tmp_path / "ws", named_models={
        f"tiny-{k}": str(v) for k, v in f.items()}))
    a, b = SimpleNamespace(session_hash="a"), SimpleNamespace(session_hash="b")
    lora = make_adapter(f["base"], tmp_path / "lora", ["q_proj"], seed=5)
    assert "ws:style" in wb.upload([str(p) for p in lora.iterdir()], "style", "", a)
    text = two_stage({k: f"tiny-{k}" for k in f}, first="stage1+ws:style")
    md, _, ref = wb.merge(text, "chain", a, None)
    assert "stage1 (merged), final (merged)" in md and ref == "ws:chain"
    md, _, _ = wb.merge(text, "chain2", a, None)
    assert "stage1 (reused)" in md
    ws = wb.workspace(a)
    assert len(list((ws.tmp_dir / "intermediate").glob("*/stage1"))) == 1
    assert torch.equal(load(ws.item_path("ws:chain"))[MID], load(ws.item_path("ws:chain2"))[MID])
    card = (ws.item_path("ws:chain") / "README.md").read_text()
    assert f"2. **final** (this model): linear of stage1+style, {f['ft3'].name}\n" in card  # public names
    assert str(ws.path) not in card
    # another session sees neither the adapter nor the cache: its own run fails on ws:style, one line
    with pytest.raises(gr.Error, match="ws:style: no such item"):
        wb.merge(text, "chain", b, None)
    with pytest.raises(gr.Error, match="'stag1' is neither a stage"):
        wb.merge(two_stage({k: f"tiny-{k}" for k in f}, first="stag1"), "bad", a, None)


def test_merge_form_says_a_multistage_recipe_is_edited_in_the_yaml(tiny_llama_family):
    from ui.forms import merge_form_from_yaml

    with pytest.raises(WeightsmithError, match=r"multi-stage recipe \(2 stages\) is edited in the YAML only"):
        merge_form_from_yaml(two_stage(tiny_llama_family))
    assert merge_form_from_yaml(FINAL.format(first="a/b", **tiny_llama_family))["method"] == "linear"  # one recipe
