"""bench/lines_reproduction.py and scripts/finetune_lines.py on tiny random models: the LiNeS recipes the
bench runs scale each block's task vector as the paper says, its table holds what the evaluation library
returned, and the fine-tunes never see the held-out questions."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import bench.lines_reproduction as bench  # noqa: E402
from checkpoints.sources import resolve  # noqa: E402
from evaluation import evaluate_models  # noqa: E402
from evaluation.cache import EvalCache  # noqa: E402
from merging.engine import run_merge  # noqa: E402
from scripts import finetune_lines  # noqa: E402


def _tensors(folder: Path) -> tuple[dict[str, torch.Tensor], object]:
    ckpt = resolve(str(folder))
    reader = ckpt.reader()
    return {k: reader.get(k, dtype=None) for k in reader.keys()}, ckpt.spec


def test_single_task_lines_scales_block_l_by_alpha_plus_beta_l(tiny_llama_family, tmp_path):
    base, ft = tiny_llama_family["base"], tiny_llama_family["ft1"]
    out = tmp_path / "lines"
    run_merge(bench.single_task_recipe(str(base), str(ft), 0.25), out)
    got, spec = _tensors(out)
    b, f = _tensors(base)[0], _tensors(ft)[0]
    # Hand-computed for L = 4, α = 0.25, β = 0.75: λ(ℓ) = 0.25 + 0.75·ℓ/3.
    lam = {0: 0.25, 1: 0.5, 2: 0.75, 3: 1.0, None: 0.25}
    seen = set()
    for name, t in got.items():
        block = spec.block_of(name)
        seen.add(block)
        want = b[name] + lam[block] * (f[name] - b[name])
        assert torch.allclose(t, want, atol=1e-6, rtol=0), name
        if lam[block] != 1.0:  # not vacuous: these tensors are neither the fine-tune nor the base
            assert not torch.allclose(t, f[name], atol=1e-5) and not torch.allclose(t, b[name], atol=1e-5), name
    assert seen == {0, 1, 2, 3, None}


def test_multi_task_lines_auto_is_one_over_t_for_task_arithmetic(tiny_llama_family, tmp_path):
    base = str(tiny_llama_family["base"])
    fts = [str(tiny_llama_family["ft1"]), str(tiny_llama_family["ft2"])]
    plain = run_merge(bench.multi_task_recipe("task_arithmetic", base, fts, None), tmp_path / "ta")
    lined = run_merge(bench.multi_task_recipe("task_arithmetic", base, fts, 0.5), tmp_path / "ta-lines")
    assert plain.lines_alpha is None
    assert lined.lines_alpha == pytest.approx(0.5, abs=1e-9)  # ‖τ1 + τ2‖₁ / (2·‖τ1 + τ2‖₁)
    b, f1, f2 = (_tensors(Path(p))[0] for p in (base, *fts))
    ta, spec = _tensors(tmp_path / "ta")
    tl, _ = _tensors(tmp_path / "ta-lines")
    lam = {0: 0.5, 1: 0.5 + 0.5 / 3, 2: 0.5 + 1 / 3, 3: 1.0, None: 0.5}  # α = 1/2, β = 1/2, L = 4
    for name in b:
        tau = (f1[name] - b[name]) + (f2[name] - b[name])
        assert torch.allclose(ta[name], b[name] + tau, atol=1e-6, rtol=0), name
        assert torch.allclose(tl[name], b[name] + lam[spec.block_of(name)] * tau, atol=1e-6, rtol=0), name
    emb = next(n for n in b if spec.block_of(n) is None)
    assert not torch.allclose(tl[emb], ta[emb], atol=1e-5)  # LiNeS changed the output


def test_plan_has_every_row_the_issue_asks_for():
    rows = bench.plan_rows("B", {"add": "A", "reverse": "R"}, alphas=(0.0, 0.5))
    names = [r.name for r, _, _ in rows]
    assert names == ["base", "ft-add", "ft-reverse", "lines-add-a0", "lines-add-a0.5", "lines-reverse-a0",
                     "lines-reverse-a0.5", "task_arithmetic", "task_arithmetic+lines", "ties", "ties+lines",
                     "tsv_m", "tsv_m+lines", "uniform-add-0.5", "uniform-reverse-0.5", "task_arithmetic-uniform-0.5"]
    by_name = {r.name: recipe for r, recipe, _ in rows}
    assert by_name["lines-add-a0.5"].lines.to_dict() == {"alpha": 0.5, "beta": 0.5}
    assert by_name["lines-reverse-a0"].lines.to_dict() == {"alpha": 0.0, "beta": 1.0}
    assert by_name["ties+lines"].lines.to_dict() == {"alpha": "auto", "beta": bench.MERGE_BETA}
    assert by_name["ties"].lines is None and by_name["base"] is None
    control = by_name["task_arithmetic-uniform-0.5"]
    assert control.lines is None and [m.parameters for m in control.models] == [{"weight": 0.5}] * 2
    assert by_name["ties"].method.name == "ties" and by_name["tsv_m+lines"].method.name == "tsv_m"
    rows_by_name = {r.name: r for r, _, _ in rows}
    assert rows_by_name["lines-add-a0"].tasks() == ("lines-add-mc", *bench.GENERAL_MC, bench.PERPLEXITY)
    assert set(rows_by_name["ties+lines"].tasks()) == {*bench.TARGET.values(), *bench.GENERAL_MC, bench.PERPLEXITY}


def _write_tasks(folder: Path) -> list[Path]:
    mc = [{"query": "The capital of France is", "choices": ["Paris", "Rome", "Berlin"], "gold": 0},
          {"query": "The Eiffel Tower is located in", "choices": ["Rome", "Paris"], "gold": 1},
          {"query": "The city of Berlin is in", "choices": ["Germany", "Italy", "Spain"], "gold": 0}]
    paths = []
    for name in (*bench.TARGET.values(), *bench.GENERAL_MC):
        p = folder / f"{name}.jsonl"
        p.write_text("".join(json.dumps(it) + "\n" for it in mc))
        paths.append(p)
    text = folder / f"{bench.PERPLEXITY}.txt"
    text.write_text("The capital of France is Paris . The capital of Italy is Rome . " * 6)
    return [*paths, text]


def test_table_rows_are_the_evaluation_functions_results(tiny_llama_family, tmp_path, monkeypatch):
    tasks = _write_tasks(tmp_path)
    calls = []

    def recording(models, task_list, **kw):
        result = evaluate_models(models, task_list, **kw)
        calls.append(result)
        return result

    monkeypatch.setattr(bench, "evaluate_models", recording)
    rows = [bench.Row("base", "base"), bench.Row("ft-add", "fine-tune", finetune="add", alpha=1.0, beta=0.0)]
    refs = [str(tiny_llama_family["base"]), str(tiny_llama_family["ft1"])]
    bench.score_rows(list(zip(rows, refs)), tasks, cache=EvalCache(tmp_path / "cache"))
    assert len(calls) == 1
    direct = evaluate_models(refs, [str(t) for t in tasks], cache=None)
    for row, ref in zip(rows, refs):
        for s in calls[0].scores:
            if s.model == row.name:
                for metric, value in s.metrics.items():
                    assert row.scores[f"{s.task}/{metric}"] == value
                    assert direct.value(ref, s.task, metric) == pytest.approx(value, rel=1e-6)
    # acc and acc_norm of each question file, one perplexity
    assert len(rows[0].scores) == 2 * (len(bench.TARGET) + len(bench.GENERAL_MC)) + 1
    assert rows[0].perplexity != rows[1].perplexity  # two different models, two different scores
    counts = bench.question_counts(calls[0])
    table = bench.table_markdown(rows, counts)
    assert f"{rows[1].perplexity:.2f}" in table and f"{rows[0].perplexity:.2f}" in table
    pooled = sum(rows[0].scores[f"{t}/acc"] * counts[t] for t in bench.GENERAL_MC) / sum(
        counts[t] for t in bench.GENERAL_MC)
    assert rows[0].general_acc(counts) == pytest.approx(pooled)


@pytest.mark.parametrize("task", sorted(finetune_lines.TASKS))
def test_finetunes_never_see_the_held_out_questions(task):
    on_disk = [json.loads(line) for line in finetune_lines.task_file(task).read_text().splitlines()]
    assert on_disk == finetune_lines.held_out_items(task)  # the bundled file is what the script writes
    held = finetune_lines.held_out_queries(task)
    assert len(held) == finetune_lines.HELD_OUT_N
    train = finetune_lines.training_items(task, 960, held)
    assert not held & {q for q, _ in train}
    for item in on_disk:  # the gold choice is the rule's answer, and only one choice is
        assert len(set(item["choices"])) == 4
    if task == "add":  # not vacuous: unfiltered, the training draw does hit held-out questions
        assert held & {q for q, _ in finetune_lines.training_items(task, 960, set())}
        first = on_disk[0]
        a, b = (int(x) for x in first["query"].split("What is ")[1].split("?")[0].split(" + "))
        assert first["choices"][first["gold"]] == str(a + b)


def test_training_batch_scores_only_the_answer(tiny_tokenizer):
    ids, mask, labels = finetune_lines.batch_tensors(tiny_tokenizer, [("The capital of France is", "Paris"),
                                                                      ("The city is", "Rome")])
    q = tiny_tokenizer("The capital of France is", add_special_tokens=False)["input_ids"]
    a = tiny_tokenizer(" Paris", add_special_tokens=False)["input_ids"]
    assert ids[0].tolist() == q + a + [tiny_tokenizer.eos_token_id]
    assert labels[0].tolist() == [-100] * len(q) + a + [tiny_tokenizer.eos_token_id]
    assert mask[1].tolist() == [1, 1, 1, 1, 1, 0, 0]  # 3 query + 1 answer + end, right-padded
    assert labels[1].tolist()[-2:] == [-100, -100]


def test_a_merge_made_from_the_same_recipe_and_inputs_is_reused(tiny_llama_family, tmp_path, monkeypatch):
    recipe = bench.single_task_recipe(str(tiny_llama_family["base"]), str(tiny_llama_family["ft1"]), 0.5)
    out, alpha = bench.make_model(recipe, tmp_path / "m")
    assert alpha == 0.5 and (out / "bench_inputs.json").is_file()

    def no_merge(*a, **kw):
        raise AssertionError("merged again")

    monkeypatch.setattr(bench, "run_merge", no_merge)
    assert bench.make_model(recipe, tmp_path / "m") == (out, 0.5)  # failed while tuples were compared to lists
    other = bench.single_task_recipe(str(tiny_llama_family["base"]), str(tiny_llama_family["ft1"]), 0.25)
    with pytest.raises(AssertionError, match="merged again"):  # another recipe is merged
        bench.make_model(other, tmp_path / "m")
