"""Task-vector analysis (issue 14 item 6): hand-computed cases, the recipe on tiny models, the CLI,
the gradio_client endpoint and bad input."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from checkpoints.errors import WeightsmithError  # noqa: E402
from checkpoints.jobs import Cancelled, Job  # noqa: E402
from merging.analysis import analyze_recipe, tensor_stats  # noqa: E402
from merging.recipe import MergeRecipe  # noqa: E402


def stats(*taus, density=1.0, weights=None):
    ts = [torch.tensor(t, dtype=torch.float32) for t in taus]
    return tensor_stats(ts, [density] * len(ts), weights or [1.0] * len(ts))


# -- hand-computed tiny cases ---------------------------------------------------------------

def test_cosine_zero_one_minus_one_and_norms():
    orth = stats([3.0, 0, 0, 0], [0, 4.0, 0, 0])
    assert orth.norms == [3.0, 4.0]
    assert orth.cosine == [[1.0, 0.0], [0.0, 1.0]]
    same = stats([1.0, -2, 2, 0], [2.0, -4, 4, 0])  # τ2 = 2·τ1
    assert same.norms == [3.0, 6.0] and same.cosine[0][1] == pytest.approx(1.0, abs=1e-12)
    opposite = stats([1.0, -2, 2, 0], [-1.0, 2, -2, 0])
    assert opposite.cosine[0][1] == pytest.approx(-1.0, abs=1e-12)
    # Non-vacuity: the three cases differ, and a zero task vector has no angle.
    assert {round(s.cosine[0][1]) for s in (orth, same, opposite)} == {0, 1, -1}
    assert stats([0.0, 0, 0], [1.0, 2, 3]).cosine[0][1] is None


def test_sign_conflicts_counted_after_the_trim():
    # density 0.5 of 6 entries keeps 3 per model:
    #   τ̂1 = [3, -2, 0, 0, 5, 0]        (|3|, |-2|, |5|)
    #   τ̂2 = [-4, -2.5, 3, 0, 0, 0]     (|-4|, |3|, |-2.5|)
    # kept anywhere: positions 0, 1, 2, 4 -> 4; signs disagree only at position 0 -> 1 conflict.
    t1, t2 = [3.0, -2, 1, 0, 5, -1], [-4.0, -2.5, 3, 2, 0.5, 0.1]
    s = stats(t1, t2, density=0.5)
    assert (s.kept, s.conflicts, s.conflict_rate) == (4, 1, 0.25)
    assert s.kept_fraction == pytest.approx([10 / 12, 9.5 / 12.1], rel=1e-6)
    # Without the trim every nonzero entry counts: positions 0 (3 vs −4) and 5 (−1 vs 0.1) disagree.
    full = stats(t1, t2, density=1.0)
    assert (full.kept, full.conflicts) == (6, 2) and full.kept_fraction == [1.0, 1.0]
    # A negative weight flips a model's signs before the election, as mergekit weights before it:
    # now positions 1 (−2 vs +2.5) disagrees and 0 agrees.
    flipped = stats(t1, t2, density=0.5, weights=[1.0, -1.0])
    assert (flipped.kept, flipped.conflicts) == (4, 1)
    opposite = stats([1.0, -2, 2, 0], [-1.0, 2, -2, 0])
    assert (opposite.kept, opposite.conflicts) == (3, 3)
    assert (stats([1.0, -2, 2, 0], [-1.0, 2, -2, 0], weights=[1.0, -1.0]).conflicts) == 0


def test_kept_fraction_of_a_hand_made_vector():
    tau = [4.0, -3, 2, 1]  # ‖τ‖₁ = 10
    assert stats(tau, density=0.5).kept_fraction == [pytest.approx(0.7)]   # keeps 4 and -3
    assert stats(tau, density=0.25).kept_fraction == [pytest.approx(0.4)]  # keeps 4
    assert stats(tau, density=0.1).kept_fraction == [pytest.approx(0.4)]   # max(1, ⌊0.4⌋) = 1 entry
    assert stats(tau, density=1.0).kept_fraction == [1.0]


def test_matches_the_definition_on_random_task_vectors():
    # Independent reference: torch.topk for the trim, "both signs present" for a conflict.
    g = torch.Generator().manual_seed(0)
    taus = [torch.randn(3000, generator=g) for _ in range(3)]
    k = int(0.3 * 3000)
    trimmed = torch.stack([t * torch.zeros_like(t).index_fill_(0, t.abs().topk(k).indices, 1) for t in taus])
    want_conflicts = int(((trimmed > 0).any(0) & (trimmed < 0).any(0)).sum())
    want_kept = int((trimmed != 0).any(0).sum())
    s = tensor_stats([t.clone() for t in taus], [0.3] * 3, [1.0] * 3)
    assert (s.conflicts, s.kept) == (want_conflicts, want_kept)
    stacked = torch.stack(taus).double()
    assert torch.allclose(torch.tensor(s.gram, dtype=torch.float64), stacked @ stacked.T, rtol=1e-5, atol=1e-3)
    assert s.kept_fraction == pytest.approx((trimmed.abs().sum(1) / torch.stack(taus).abs().sum(1)).tolist(), rel=1e-5)
    # Non-vacuity: three independent vectors at density 0.3 do clash, and not everywhere.
    assert 0 < want_conflicts < want_kept


# -- a recipe on tiny models -----------------------------------------------------------------

def recipe_text(base, *models, method="ties", density=None):
    params = "{weight: 0.5" + (f", density: {density}" if density is not None else "") + "}"
    lines = [f"merge_method: {method}"] + ([f"base_model: {base}"] if base else []) + ["models:"]
    for m in models:
        lines += [f"  - model: {m}", f"    parameters: {params}"]
    return "\n".join(lines) + "\n"


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def mirrored(tiny_llama_family, tmp_path_factory) -> Path:
    """base − (ft1 − base): the fine-tune's task vector negated."""
    out = tmp_path_factory.mktemp("mirror") / "mirror"
    shutil.copytree(tiny_llama_family["base"], out)
    base, ft1 = weights(tiny_llama_family["base"]), weights(tiny_llama_family["ft1"])
    save_file({k: 2 * base[k] - ft1[k] for k in base}, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def test_recipe_rows_norms_and_total(tiny_llama_family):
    fam = tiny_llama_family
    job = Job.recording()
    result = analyze_recipe(MergeRecipe.from_yaml(recipe_text(fam["base"], fam["ft1"], fam["ft2"], density=0.5)), job=job)
    assert [r.label for r in result.rows] == ["embeddings", "block 0", "block 1", "block 2", "block 3",
                                              "final norm", "head"]
    assert result.models == [fam["ft1"].name, fam["ft2"].name] and result.density_range == [(0.5, 0.5)] * 2
    # Norms per row equal the ones computed here from the files, row by the architecture map's block.
    base, fts = weights(fam["base"]), [weights(fam["ft1"]), weights(fam["ft2"])]
    for i, ft in enumerate(fts):
        block1 = [k for k in base if k.startswith("model.layers.1.")]
        want = math.sqrt(sum(float((ft[k] - base[k]).double().pow(2).sum()) for k in block1))
        assert result.rows[2].norms[i] == pytest.approx(want, rel=1e-5)
        head = float((ft["lm_head.weight"] - base["lm_head.weight"]).double().norm())
        assert result.rows[-1].norms[i] == pytest.approx(head, rel=1e-5)
        everything = math.sqrt(sum(float((ft[k] - base[k]).double().pow(2).sum()) for k in base))
        assert result.total.norms[i] == pytest.approx(everything, rel=1e-5)
    assert result.total.numel == sum(v.numel() for v in base.values())
    assert result.total.conflicts == sum(r.conflicts for r in result.rows)
    # Non-vacuity: the two fine-tunes differ, and seeded noise clashes at about 1/8 / 3/4 of kept entries.
    assert result.total.norms[0] != result.total.norms[1]
    assert 0.10 < result.total.conflict_rate < 0.25
    # The job saw one step per tensor and ended at 1.
    assert job.events[-1][0] == 1.0 and len(job.events) == len(base) + 1


def test_recipe_identical_and_mirrored_models(tiny_llama_family, mirrored):
    fam = tiny_llama_family
    same = analyze_recipe(MergeRecipe.from_yaml(recipe_text(fam["base"], fam["ft1"], fam["ft1"])), density=0.3)
    assert same.total.cosine[0][1] == pytest.approx(1.0, abs=1e-6) and same.total.conflicts == 0
    mirror = analyze_recipe(MergeRecipe.from_yaml(recipe_text(fam["base"], fam["ft1"], mirrored)), density=1.0)
    assert mirror.total.cosine[0][1] == pytest.approx(-1.0, abs=1e-5)
    # Every changed parameter is kept at density 1, and every one of them clashes.
    assert mirror.total.kept > 0 and mirror.total.conflicts == mirror.total.kept
    assert mirror.total.kept_fraction == [1.0, 1.0]


def test_density_from_the_recipe_or_the_argument(tiny_llama_family):
    fam = tiny_llama_family
    recipe = MergeRecipe.from_yaml(recipe_text(fam["base"], fam["ft1"], fam["ft2"], density=0.8))
    own, asked = analyze_recipe(recipe), analyze_recipe(recipe, density=0.2)
    assert own.density_range == [(0.8, 0.8)] * 2 and asked.density_range == [(0.2, 0.2)] * 2
    assert asked.total.kept_fraction[0] < own.total.kept_fraction[0] < 1
    # Task arithmetic takes no density: the TIES default of 0.2.
    ta = analyze_recipe(MergeRecipe.from_yaml(recipe_text(fam["base"], fam["ft1"], method="task_arithmetic")))
    assert ta.density_range == [(0.2, 0.2)]
    assert ta.total.kept_fraction[0] == pytest.approx(asked.total.kept_fraction[0], rel=1e-9)


def test_cancel_and_bad_input(tiny_llama_family):
    fam = tiny_llama_family
    recipe = MergeRecipe.from_yaml(recipe_text(fam["base"], fam["ft1"]))
    job = Job.recording()
    job.cancel()
    with pytest.raises(Cancelled, match="the analysis was cancelled"):
        analyze_recipe(recipe, job=job)
    linear = MergeRecipe.from_yaml(recipe_text(None, fam["ft1"], fam["ft2"], method="linear"))
    with pytest.raises(WeightsmithError, match="the recipe has no base_model; task vectors are τ = model − base"):
        analyze_recipe(linear)
    with pytest.raises(WeightsmithError, match="model 'nope/missing' of the recipe"):
        analyze_recipe(MergeRecipe.from_yaml(recipe_text(fam["base"], fam["ft1"], "nope/missing")))
    with pytest.raises(WeightsmithError, match=r"density must be in \(0, 1\], got 1.5"):
        analyze_recipe(recipe, density=1.5)


# -- the CLI ---------------------------------------------------------------------------------

def test_cli_table_json_plot(tiny_llama_family, tmp_path, capsys):
    from cli import main

    fam = tiny_llama_family
    path = tmp_path / "r.yml"
    path.write_text(recipe_text(fam["base"], fam["ft1"], fam["ft2"], density=0.5))
    out_json, out_png = tmp_path / "a.json", tmp_path / "a.png"
    assert main(["analyze", str(path), "--density", "0.3", "--json", str(out_json), "--plot", str(out_png)]) == 0
    printed = capsys.readouterr().out
    assert "block 3" in printed and "conflict" in printed and "m1 = " + fam["ft1"].name in printed
    data = json.loads(out_json.read_text())
    library = analyze_recipe(MergeRecipe.from_yaml(path), density=0.3)
    assert data["density"] == 0.3 and data["total"]["norms"] == pytest.approx(library.total.norms, rel=1e-12)
    assert data["total"]["conflicts"] == library.total.conflicts
    assert [r["row"] for r in data["rows"]] == [r.label for r in library.rows]
    assert out_png.read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "a.png", "r.yml"]  # no temp file left


def test_cli_bad_input_is_one_line_and_exit_2(tiny_llama_family, tmp_path, capsys):
    from cli import main

    fam = tiny_llama_family
    cases = {
        "nobase": (recipe_text(None, fam["ft1"], fam["ft2"], method="linear"), "no base_model"),
        "unknown": (recipe_text(fam["base"], fam["ft1"], "nope/missing"), "model 'nope/missing' of the recipe"),
    }
    for name, (text, message) in cases.items():
        path = tmp_path / f"{name}.yml"
        path.write_text(text)
        assert main(["analyze", str(path), "--json", str(tmp_path / f"{name}.json")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("weightsmith: error: ") and message in err[0], err
        assert not (tmp_path / f"{name}.json").exists()
    assert main(["analyze", str(tmp_path / "absent.yml")]) == 2
    assert "no such recipe file" in capsys.readouterr().err


# -- the app endpoint through gradio_client ---------------------------------------------------

gradio_client = pytest.importorskip("gradio_client")
from test_app_api import client, server  # noqa: E402,F401  (the launched app and its client)

ENDPOINT_RECIPE = recipe_text("tiny-base", "tiny-ft1", "tiny-ft2", density=0.5)


def test_endpoint_analyze(server, tiny_llama_family):  # noqa: F811
    c = client(server)
    md, plot, numbers = c.predict(ENDPOINT_RECIPE, 0.3, api_name="/analyze")
    fam = tiny_llama_family
    library = analyze_recipe(MergeRecipe.from_yaml(recipe_text(fam["base"], fam["ft1"], fam["ft2"])), density=0.3)
    assert numbers["density"] == 0.3
    assert numbers["total"]["norms"] == pytest.approx(library.total.norms, rel=1e-12)
    assert numbers["total"]["conflicts"] == library.total.conflicts
    assert "block 3" in md and "Task-vector analysis" in md and plot is not None
    # Empty density: the recipe's own 0.5 (non-vacuity: a different kept fraction).
    _, _, own = c.predict(ENDPOINT_RECIPE, None, api_name="/analyze")
    assert own["density_range"] == [[0.5, 0.5]] * 2
    assert own["total"]["kept_fraction"][0] > numbers["total"]["kept_fraction"][0]


def test_endpoint_bad_input_keeps_serving(server):  # noqa: F811
    c = client(server)
    with pytest.raises(Exception, match="no base_model"):
        c.predict(recipe_text(None, "tiny-ft1", "tiny-ft2", method="linear"), None, api_name="/analyze")
    with pytest.raises(Exception, match="unknown-model"):
        c.predict(recipe_text("tiny-base", "tiny-ft1", "unknown-model"), None, api_name="/analyze")
    with pytest.raises(Exception, match="density must be at most 1, not 2"):
        c.predict(ENDPOINT_RECIPE, 2.0, api_name="/analyze")
    _, _, numbers = c.predict(ENDPOINT_RECIPE, 0.5, api_name="/analyze")
    assert len(numbers["rows"]) == 7


def test_hostile_arguments_one_line(server):  # noqa: F811
    import gradio as gr
    from types import SimpleNamespace

    from test_app_endpoints_hostile import HOSTILE, UNEXPECTED

    wb = server[0].workbench
    good = (ENDPOINT_RECIPE, 0.3)
    refused = []
    for i in range(len(good)):
        for label, bad in HOSTILE.items():
            args = good[:i] + (bad,) + good[i + 1:]
            try:
                wb.analyze(*args, SimpleNamespace(session_hash=f"hostile-{i}-{label}"), progress=None)
            except gr.Error as e:
                msg = str(e.message)
                assert "\n" not in msg and UNEXPECTED not in msg, (i, label, msg)
                refused.append(msg)
    # Non-vacuity: every bad value was refused but a None density (the recipe's own), which works.
    assert "density must be at least 0, not -3" in refused and "recipe_yaml must be text, not a list" in refused
    assert len(refused) == 2 * len(HOSTILE) - 1


# -- the Merge tab's wiring ------------------------------------------------------------------

from test_app_page import page  # noqa: E402,F401  (the built page, no server)


def test_page_analyze_clears_first_and_stop_cancels_it(page):  # noqa: F811
    (fid,) = [i for i, f in page.fns.items() if f.api_name == "analyze"]
    analyze = page.fns[fid]
    before = page.fns[analyze.trigger_after]
    # The previous analysis goes first: beside a failure it would read as this run's result.
    assert before.fn() == ("", None, None)
    assert [o._id for o in before.outputs] == [o._id for o in analyze.outputs]
    assert [type(o).__name__ for o in analyze.outputs] == ["Markdown", "Plot", "JSON"]
    assert (analyze.concurrency_id, analyze.concurrency_limit) == ("heavy", 1)  # one heavy job at a time
    # The Merge tab's Stop cancels the analysis as it cancels the merge.
    (merge,) = [f for f in page.fns.values() if f.api_name == "merge"]
    stoppers = [f for f in page.fns.values() if f.is_cancel_function and fid in f.cancels]
    assert len(stoppers) == 1 and merge._id in stoppers[0].cancels
