"""ROME / MEMIT / EditSession on tiny random llama and gpt2 (and one slow demo-model test)."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest
import torch

from checkpoints.errors import WeightsmithError
from editing.evaluate import evaluate_edit, load_records, parse_record, target_logprobs
from editing.request import EditRequest, subject_span, target_ids
from editing.rome import RomeHyperParams, SplitBatch, rank_one_update
from editing.session import EditSession
from editing.stats import StatsCache, corpus_from_file

WORDS = ("the capital of France is Paris . The Eiffel Tower is located in the city of Paris . "
         "Berlin is the capital of Germany . Rome is in Italy . Madrid is in Spain . "
         "The tower speaks French , plays football and tennis .").split()
FAST = RomeHyperParams(v_steps=25, prefix_lengths=((2, 2), (3, 2)), v_lr=0.5, clamp_norm_factor=10.0)
EIFFEL = EditRequest("The {} is located in the city of", "Eiffel Tower", "Rome")


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> Path:
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(len(WORDS), (3000,), generator=g).tolist()
    text = "\n".join(" ".join(WORDS[i] for i in idx[j:j + 30]) for j in range(0, 3000, 30))
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def stats(tmp_path_factory) -> StatsCache:
    return StatsCache(tmp_path_factory.mktemp("stats"))


def load(folder: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def session_for(folder, corpus_file, stats, **kw) -> EditSession:
    # These tests pin ROME's single-layer update (rank one per edit, one weight); the library's default
    # method (MEMIT) is tested where it is the subject (test_memit_*, test_app's method choice).
    kw.setdefault("method", "r-rome")
    model, tok = load(folder)
    return EditSession(model, tok, stats=stats, hparams=kw.pop("hparams", FAST), corpus=corpus_from_file(corpus_file),
                       base_name="test-org/tiny", **kw)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def tlp(s: EditSession, req: EditRequest) -> float:
    return target_logprobs(s.model, s.tokenizer, [req.text], [req.target])[0]


def _sharp(model):
    # A random init (std 0.02) has near-uniform logits and near-zero MLP outputs, so no edit
    # could move a prediction much. Scaling every matrix by 10 gives activations and logits of a
    # trained model's size.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(10.0)
    return model


@pytest.fixture(scope="module")
def sharp_dirs(tmp_path_factory) -> dict[str, Path]:
    from conftest import build_tiny_gpt2, build_tiny_llama, save_model

    return {"llama": save_model(_sharp(build_tiny_llama(0)), tmp_path_factory.mktemp("sharp-llama")),
            "llama_tied": save_model(_sharp(build_tiny_llama(0, tie=True)), tmp_path_factory.mktemp("sharp-tied")),
            "gpt2": save_model(_sharp(build_tiny_gpt2(0)), tmp_path_factory.mktemp("sharp-gpt2"))}


@pytest.fixture(params=["llama", "gpt2"])
def folder(request, sharp_dirs) -> Path:
    return sharp_dirs[request.param]


@pytest.fixture
def tiny_llama_dir(sharp_dirs) -> Path:  # shadows conftest's within this file: the sharpened llama
    return sharp_dirs["llama"]


@pytest.fixture
def tiny_llama_tied_dir(sharp_dirs) -> Path:
    return sharp_dirs["llama_tied"]


def test_tokenisation_rules(tiny_tokenizer):
    # The target gets a leading space and no special tokens, whatever the user typed.
    assert target_ids(tiny_tokenizer, "Rome") == target_ids(tiny_tokenizer, " Rome") == [tiny_tokenizer.convert_tokens_to_ids("ĠRome")]
    text = "The Eiffel Tower is located in"
    assert subject_span(tiny_tokenizer, text, text.find("Eiffel Tower"), "Eiffel Tower") == (1, 2)


def test_split_batch_equals_full_forward(tiny_llama_dir):
    model, tok = load(tiny_llama_dir)
    rows, split = [[5, 6, 7, 8, 9], [11, 12, 13], [4, 5, 6]], [3, 1, 0]  # a head of length 0 too
    with torch.no_grad():
        h = SplitBatch(model, tok, rows, split).run()
        for i, (r, s) in enumerate(zip(rows, split)):
            full = model.base_model(input_ids=torch.tensor([r])).last_hidden_state[0]
            torch.testing.assert_close(h[i, : len(r) - s], full[s:], atol=1e-5, rtol=1e-5)


def test_rank_one_update_is_exact_at_the_chosen_key():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(6, 5, generator=g)
    X = torch.randn(50, 5, generator=g)
    C = X.T @ X / 50
    k_star, at, v = torch.randn(5, generator=g), torch.randn(5, generator=g), torch.randn(6, generator=g)
    for where in (None, at):
        B, A = rank_one_update(W, k_star, v, C, at=where)
        a = k_star if where is None else at
        dW = torch.outer(B, A)
        torch.testing.assert_close((W + dW) @ a, v, atol=1e-5, rtol=1e-5)  # v reproduced exactly at that key
        u = torch.linalg.solve(C.double(), k_star.double()).float()
        torch.testing.assert_close(A, u)  # the direction is C⁻¹k* either way
        assert (W @ a - v).abs().max() > 0.1  # non-vacuous: W alone does not give v
    # The two choices differ unless the keys coincide.
    assert not torch.allclose(rank_one_update(W, k_star, v, C)[0], rank_one_update(W, k_star, v, C, at=at)[0])


def test_rank_one_and_target_rises(folder, corpus_file, stats):
    s = session_for(folder, corpus_file, stats)
    before = snapshot(s.model)
    lp0 = tlp(s, EIFFEL)
    req = EditRequest(EIFFEL.prompt, EIFFEL.subject, EIFFEL.target, layer=1)
    edit = s.apply(req)
    after = snapshot(s.model)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    pname = f"{s.spec.module('mlp_out', 1)}.weight"
    assert changed == [pname]  # exactly one tensor touched
    dW = s.spec.as_out_in(after[pname] - before[pname]).double()
    assert dW.abs().max() > 1e-4  # non-vacuous
    assert torch.linalg.matrix_rank(dW, rtol=1e-4) == 1
    B, A = edit.factors[s.spec.module("mlp_out", 1)]
    assert B.shape == (dW.shape[0], 1) and A.shape == (1, dW.shape[1])
    assert tlp(s, EIFFEL) > lp0 + 0.3
    assert s.history[0]["subject"] == "Eiffel Tower" and s.history[0]["layers"] == [1]


def test_undo_bit_exact_any_order(tiny_llama_dir, corpus_file, stats):
    s = session_for(tiny_llama_dir, corpus_file, stats)
    original = snapshot(s.model)
    e1 = s.apply(EditRequest(EIFFEL.prompt, EIFFEL.subject, "Rome", layer=1))
    after1 = snapshot(s.model)
    e2 = s.apply(EditRequest("The capital of {} is", "France", "Berlin", layer=1))
    e3 = s.apply(EditRequest("{} is the capital of", "Madrid", "Italy", layer=2))
    assert not same(snapshot(s.model), original)
    pname = f"{s.spec.module('mlp_out', 1)}.weight"
    # Out of order: undoing edit 1 leaves exactly pristine + Δ2 on that tensor.
    s.undo(e1.id)
    assert torch.equal(s.model.get_parameter(pname), original[pname] + e2.deltas[pname])
    assert [h["id"] for h in s.history] == [e2.id, e3.id]
    s.undo(e3.id)
    s.undo(e2.id)
    assert same(snapshot(s.model), original)
    # Undo of the last edit returns the bits from before it.
    e4 = s.apply(EditRequest(EIFFEL.prompt, EIFFEL.subject, "Rome", layer=1))
    assert same(snapshot(s.model), after1)  # and edits are deterministic
    s.undo(e4.id)
    assert same(snapshot(s.model), original)
    with pytest.raises(WeightsmithError, match="no active edit"):
        s.undo(e1.id)


def test_memit_window_is_the_same_for_a_given_layer_and_the_default():
    """A layer typed in (or a trace's suggestion) and the default give MEMIT the same window: the demo
    model's default is layer 4 and layers 2-5, whose statistics `weightsmith demo-model` prepares."""
    from editing.memit import MemitHyperParams
    from editing.rome import default_layer

    hp = MemitHyperParams()
    assert default_layer("llama", 30) == 4
    assert hp.layers_for("llama", 30) == hp.layers_for("llama", 30, 4) == [2, 3, 4, 5]
    assert hp.layers_for("llama", 30, 3) == [1, 2, 3, 4] and hp.layers_for("llama", 30, 0) == [0, 1]
    assert hp.layers_for("llama", 30, 29) == [26, 27, 28, 29]
    assert MemitHyperParams(layers=[7, 8]).layers_for("llama", 30) == [7, 8]  # set layers win over the default
    with pytest.raises(WeightsmithError, match="layer 30 is out of range"):
        hp.layers_for("llama", 30, 30)


def memit_ranks(s: EditSession, given: list[int]) -> dict[str, int]:
    """Rank per down projection after MEMIT edits given these layers: one per edit whose window holds it
    (the window around layer L is L-2..L+1, cut to the model)."""
    ranks: dict[str, int] = {}
    for layer in given:
        top = min(s.num_layers - 1, layer + 1)
        for low in range(max(0, top - 3), top + 1):
            ranks[s.spec.module("mlp_out", low)] = ranks.get(s.spec.module("mlp_out", low), 0) + 1
    return ranks


@pytest.mark.parametrize("method", ["r-rome", "memit"])
def test_adapter_export_equals_in_place(folder, corpus_file, stats, tmp_path, method):
    from peft import PeftModel

    s = session_for(folder, corpus_file, stats, method=method)
    ids = torch.tensor([s.tokenizer(EIFFEL.text)["input_ids"]])
    with torch.no_grad():
        base_logits = s.model(ids).logits
    s.apply(EditRequest(EIFFEL.prompt, EIFFEL.subject, "Rome", layer=1))
    s.apply(EditRequest("The capital of {} is", "France", "Berlin", layer=1))
    s.apply(EditRequest("{} is the capital of", "Madrid", "Italy", layer=2))
    with torch.no_grad():
        edited_logits = s.model(ids).logits
    assert (edited_logits - base_logits).abs().max() > 1e-2  # the edits change the output
    out = s.export_adapter(tmp_path / "adapter")
    cfg = json.loads((out / "adapter_config.json").read_text())
    mlp = partial(s.spec.module, "mlp_out")
    # one rank per edit and weight it touched: MEMIT spreads an edit given layer L over the four around it
    ranks = {"r-rome": {mlp(1): 2, mlp(2): 1}, "memit": memit_ranks(s, [1, 1, 2])}[method]
    assert cfg["rank_pattern"] == ranks
    card = (out / "README.md").read_text()
    assert method in card and "weightsmith" in card and "base_model: test-org/tiny" in card and "Eiffel Tower" in card
    fresh, _ = load(folder)
    peft_model = PeftModel.from_pretrained(fresh, str(out)).eval()
    with torch.no_grad():
        adapter_logits = peft_model(ids).logits
    torch.testing.assert_close(adapter_logits, edited_logits, atol=1e-4, rtol=1e-4)
    # and the rank-one factors reproduce the stored delta exactly
    tensors, _ = s.adapter_tensors()
    e = s.edits[-1]
    module, (B, A) = next(iter(e.factors.items()))
    assert torch.equal(s.spec.from_out_in(B @ A), e.deltas[f"{module}.weight"])


def test_export_full_model(tiny_llama_tied_dir, corpus_file, stats, tmp_path):
    s = session_for(tiny_llama_tied_dir, corpus_file, stats)
    s.apply(EditRequest(EIFFEL.prompt, EIFFEL.subject, "Rome", layer=1))
    out = s.export_model(tmp_path / "edited")
    reloaded, tok = load(out)
    ids = torch.tensor([tok(EIFFEL.text)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, s.model(ids).logits, atol=0, rtol=0)
    assert json.loads((out / "edit_log.json").read_text())[0]["target_new"] == "Rome"
    assert "base_model_relation: finetune" in (out / "README.md").read_text()
    with pytest.raises(WeightsmithError, match="already exists"):
        s.export_model(out)


@pytest.mark.parametrize("req, message", [
    (EditRequest("The tower is in", "Louvre", "Rome"), "does not occur"),
    (EditRequest("The {} is located in the city of", "Eiffel Tower", "  "), "target is empty"),
    (EditRequest("The {} is in" + " the" * 300, "Eiffel Tower", "Rome"), "too long"),
    (EditRequest("The {} is in", "Eiffel Tower", "Rome", layer=4), "out of range"),
    (EditRequest("The {} is in", "Eiffel Tower", "Rome", layer=-1), "out of range"),
])
def test_bad_input_leaves_weights(tiny_llama_dir, corpus_file, stats, req, message):
    s = session_for(tiny_llama_dir, corpus_file, stats)
    before = snapshot(s.model)
    with pytest.raises(WeightsmithError, match=message):
        s.apply(req)
    assert same(snapshot(s.model), before) and s.history == []


def test_unsupported_architecture(tiny_llama_dir, corpus_file, stats):
    model, tok = load(tiny_llama_dir)
    model.config.model_type = "mamba"
    before = snapshot(model)
    with pytest.raises(WeightsmithError, match="unsupported architecture 'mamba'"):
        EditSession(model, tok, stats=stats, corpus=corpus_from_file(corpus_file))
    assert same(snapshot(model), before)


def test_memit_batch_raises_targets(tiny_llama_dir, corpus_file, stats):
    from editing.memit import MemitHyperParams

    s = session_for(tiny_llama_dir, corpus_file, stats, memit_hparams=MemitHyperParams(v_steps=25))
    original = snapshot(s.model)
    reqs = [EditRequest(EIFFEL.prompt, EIFFEL.subject, "Rome"), EditRequest("{} is the capital of", "Madrid", "Italy")]
    lp0 = [tlp(s, r) for r in reqs]
    e = s.apply_batch(reqs, layers=[1, 2])
    lp1 = [tlp(s, r) for r in reqs]
    assert all(b > a + 0.2 for a, b in zip(lp0, lp1)), (lp0, lp1)
    assert e.method == "memit" and e.layers == [1, 2] and len(s.history) == 1
    for module, (B, A) in e.factors.items():
        assert B.shape[1] == A.shape[0] == 2  # rank one per fact
    s.undo(e.id)
    assert same(snapshot(s.model), original)


def test_memit_sequence_keeps_the_refold_invariant(tiny_llama_dir, corpus_file, stats):
    """MEMIT's temporary per-layer changes are undone by copying the saved bits back: after a sequence the
    weights are exactly pristine + Δ₁ + Δ₂ + … in history order, and undoing the first edit leaves exactly
    pristine + the others."""
    from editing.memit import MemitHyperParams

    s = session_for(tiny_llama_dir, corpus_file, stats, memit_hparams=MemitHyperParams(v_steps=5))
    original = snapshot(s.model)
    first = s.apply_batch([EditRequest(EIFFEL.prompt, EIFFEL.subject, "Rome")], layers=[1, 2])
    second = s.apply_batch([EditRequest("{} is the capital of", "Madrid", "Italy")], layers=[1, 2])
    names = set(first.deltas) | set(second.deltas)
    assert len(names) == 2  # non-vacuity: both layers' down projections moved
    for name in names:
        expected = original[name] + first.deltas[name] + second.deltas[name]
        assert torch.equal(s.model.get_parameter(name).detach(), expected)
        assert not torch.equal(expected, original[name] + second.deltas[name])
    s.undo(first.id)
    for name in names:
        assert torch.equal(s.model.get_parameter(name).detach(), original[name] + second.deltas[name])
    s.undo(second.id)
    assert same(snapshot(s.model), original)


def test_replay_reproduces_a_sequence_bit_for_bit(tiny_llama_dir, corpus_file, stats):
    """Saved factors replayed on fresh weights give the same bits and keep the original checks (a long
    sequence resumed in bench/sequential_edits.py goes on from exactly where it stopped)."""
    from editing.memit import MemitHyperParams

    hp = MemitHyperParams(v_steps=5)
    s = session_for(tiny_llama_dir, corpus_file, stats, method="memit", memit_hparams=hp)
    original = snapshot(s.model)
    reqs = [EditRequest(EIFFEL.prompt, EIFFEL.subject, "Rome", layer=2), EditRequest("{} is the capital of", "Madrid", "Italy", layer=2)]
    for r in reqs:
        s.apply(r)
    edited = snapshot(s.model)
    assert not same(edited, original)  # non-vacuity
    fresh = session_for(tiny_llama_dir, corpus_file, stats, method="memit", memit_hparams=hp)
    for e in s.edits:
        fresh.replay(e.method, e.requests, e.layers, e.factors, keys=e.keys, checks=e.info["checks"])
    assert same(snapshot(fresh.model), edited)
    assert [e.info["checks"] for e in fresh.edits] == [e.info["checks"] for e in s.edits]
    assert fresh._norms == s._norms  # the outlier check's reference goes on as it was
    fresh.undo_all()
    assert same(snapshot(fresh.model), original)


def test_stats_cache_keys(tiny_llama_dir, corpus_file, tmp_path):
    cache = StatsCache(tmp_path / "st")
    s = session_for(tiny_llama_dir, corpus_file, cache)
    C1 = s.statistics(1)[1]
    assert C1.shape == (48, 48) and torch.allclose(C1, C1.T) and torch.linalg.eigvalsh(C1.double()).min() > 0
    files = list((tmp_path / "st").glob("*.safetensors"))
    assert len(files) == 1
    # the same model loaded again reads the cached file (memory off: from disk)
    fresh = StatsCache(tmp_path / "st", memory=False)
    k = fresh.key(s.model, s.spec, 1, s.corpus, fresh_tokens := 100_000)
    assert torch.equal(fresh.lookup(k), C1)
    # an edit of layer 1 keeps layer 1's key (its down projection is not an input), changes layer 2's
    k2 = fresh.key(s.model, s.spec, 2, s.corpus, fresh_tokens)
    s.apply(EditRequest(EIFFEL.prompt, EIFFEL.subject, "Rome", layer=1))
    assert fresh.key(s.model, s.spec, 1, s.corpus, fresh_tokens) == k
    assert fresh.key(s.model, s.spec, 2, s.corpus, fresh_tokens) != k2


def test_evaluate_formats(tiny_llama_dir, tmp_path):
    flat = {"prompt": "The {} is located in the city of", "subject": "Eiffel Tower", "target_new": "Rome",
            "ground_truth": "Paris", "rephrase_prompt": "The Eiffel Tower is in", "locality_prompt": "Berlin is in",
            "locality_ground_truth": "Germany"}
    orig = {"case_id": 1, "requested_rewrite": {"prompt": "The {} is located in the city of", "subject": "Eiffel Tower",
                                                "target_new": {"str": "Rome"}, "target_true": {"str": "Paris"}},
            "paraphrase_prompts": ["The Eiffel Tower is in"], "neighborhood_prompts": ["Berlin is in"]}
    a, b = parse_record(flat), parse_record(orig)
    assert (a.paraphrases, a.neighborhood, a.neighborhood_true) == (["The Eiffel Tower is in"], ["Berlin is in"], "Germany")
    assert (b.target_new, b.target_true, b.neighborhood_true) == ("Rome", "Paris", None)
    path = tmp_path / "r.json"
    path.write_text(json.dumps([flat, orig]))
    assert len(load_records(path)) == 2 and len(load_records(path, limit=1)) == 1
    model, tok = load(tiny_llama_dir)
    scores = evaluate_edit(model, tok, b)
    assert set(scores) == {"efficacy", "paraphrase", "neighborhood", "efficacy_magnitude", "paraphrase_magnitude",
                           "neighborhood_magnitude"}
    # NS is the complement of "new beats true" on the same prompt pair
    assert scores["neighborhood"] in (0.0, 1.0)
    with pytest.raises(WeightsmithError, match="missing field"):
        parse_record({"prompt": "x"})


def test_cli_edit_and_eval(tiny_llama_dir, corpus_file, tmp_path, monkeypatch, capsys):
    # In-process (cli.main is what the console script runs): three interpreter start-ups cost
    # ~30 s of imports. Statistics go to a temp WEIGHTSMITH_HOME, never the user's cache.
    from cli import main

    monkeypatch.setenv("WEIGHTSMITH_HOME", str(tmp_path / "home"))
    out = tmp_path / "adapter"
    code = main(["edit", str(tiny_llama_dir), "--prompt", "The {} is located in the city of", "--subject",
                 "Eiffel Tower", "--target", "Rome", "--out", str(out), "--as-adapter", "--layer", "1",
                 "--stats-corpus", str(corpus_file)])
    assert code == 0, capsys.readouterr().err
    assert (out / "adapter_model.safetensors").stat().st_size < 10_000
    assert list((tmp_path / "home" / "stats").glob("*.safetensors"))  # the statistics landed in the temp home
    records = tmp_path / "recs.json"
    records.write_text(json.dumps([{"prompt": "The {} is located in the city of", "subject": "Eiffel Tower",
                                    "target_new": "Rome", "ground_truth": "Paris",
                                    "rephrase_prompt": "The Eiffel Tower is in", "locality_prompt": "Berlin is in",
                                    "locality_ground_truth": "Germany"}]))
    capsys.readouterr()
    code = main(["eval-edits", str(tiny_llama_dir), str(records), "--limit", "1", "--layer", "1",
                 "--stats-corpus", str(corpus_file), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    assert set(result) >= {"n", "efficacy", "paraphrase", "neighborhood", "score", "seconds_per_edit", "baseline"}
    assert result["n"] == 1 and 0.0 <= result["efficacy"] <= 1.0 and result["baseline"]["n"] == 1
    code = main(["edit", str(tiny_llama_dir), "--prompt", "The tower is in", "--subject", "Louvre",
                 "--target", "Rome", "--out", str(tmp_path / "x")])
    assert code == 2 and "does not occur" in capsys.readouterr().err and not (tmp_path / "x").exists()


SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.mark.slow
def test_demo_edit_changes_generation(demo_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(demo_dir).eval()
    tok = AutoTokenizer.from_pretrained(demo_dir)
    wiki = SHARED / "wikitext-2-raw" / "wiki.test.raw"
    # Kept cheap: a small statistics corpus (a wikitext slice when present, else model-sampled text)
    # in a temp cache (never the user's), and 4 five-token prefixes instead of 20 for k*.
    if wiki.is_file():
        corpus, n = corpus_from_file(wiki), 5_000
    else:
        corpus, n = None, 4_000  # model-sampled text
    s = EditSession(model, tok, stats=StatsCache(tmp_path / "stats"), corpus=corpus, stats_tokens=n,
                    hparams=RomeHyperParams(mom2_ridge=0.0 if wiki.is_file() else 0.05,
                                            prefix_lengths=((5, 4),)))
    prompt = "The Eiffel Tower is located in the city of"

    def greedy() -> str:
        enc = tok(prompt, return_tensors="pt")
        out = model.generate(**enc, max_new_tokens=6, do_sample=False)
        return tok.decode(out[0, enc["input_ids"].shape[1]:])

    assert "Paris" in greedy()
    s.apply(EditRequest("{} is located in the city of", "Eiffel Tower", "Rome"))
    assert "Rome" in greedy()


def test_statistics_identity_is_hashed_once_per_layer(tiny_llama_dir, corpus_file, stats, monkeypatch):
    """A session hashes the weights behind a layer's statistics key once, not on every edit (the pristine
    weights never change), and still finds the same cache entry as a fresh hash would."""
    import editing.session as session_module

    calls: list[int] = []
    real = session_module.layer_identity

    def counting(model, spec, layer):
        calls.append(layer)
        return real(model, spec, layer)

    monkeypatch.setattr(session_module, "layer_identity", counting)
    s = session_for(tiny_llama_dir, corpus_file, stats)
    for target in ("Rome", "Madrid", "Berlin"):
        s.apply(EditRequest(EIFFEL.prompt, EIFFEL.subject, target, layer=1))
    assert calls == [1]  # three edits, one hash
    with s._pristine_weights():
        assert s._identities[1] == real(s.model, s.spec, 1)  # the remembered key is the pristine model's
