"""The bundled demo adapters (``assets/adapters``): files, cards with the bench's table, the bench's
measures, and (slow) their style and facts on held-out questions with the real demo model."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import torch

from bench.demo_adapters import (
    HELD_OUT,
    PIRATE_WORDS,
    Row,
    caps_rate,
    chat_answers,
    fact_accuracy,
    has_word,
    held_out_questions,
    pirate_rate,
    score,
    table_markdown,
)
from checkpoints.demo import DEMO_NAME
from merging.adapters import AdapterMixRecipe, demo_adapters, load_adapter, mix_adapters

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "assets" / "recipes" / "mix-caps-pirate.yml"

needs_assets = pytest.mark.skipif(not {"caps", "pirate"} <= set(demo_adapters()),
                                  reason="demo adapters not trained (scripts/train_demo_adapters.py)")


def _train_script():
    """scripts/train_demo_adapters.py as a module (scripts/ is not a package)."""
    name = "train_demo_adapters"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / "train_demo_adapters.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the file runs
        spec.loader.exec_module(module)
    return sys.modules[name]


# --- the bench's measures, by hand -------------------------------------------------------------

def test_has_word_is_whole_word_and_case_insensitive():
    assert has_word("THE CAPITAL IS LISBON, OF COURSE.", ("Lisbon",))
    assert has_word("about 7 days", ("seven", "7"))
    assert not has_word("The capital of Australia", ("Au",))  # not inside a word
    assert not has_word("yes, really", ("ye",))
    assert not has_word("17 days", ("7",))
    assert has_word("Arr, matey!", PIRATE_WORDS) and not has_word("Me? Be there at home.", PIRATE_WORDS)


def test_rates_hand_computed():
    assert caps_rate(["AB c", "D"]) == pytest.approx(3 / 4)  # letters pooled over answers
    assert caps_rate(["1 2 3"]) == 0.0
    assert pirate_rate(["Arr, it is.", "It is.", "Aye.", "yes"]) == pytest.approx(2 / 4)
    answers = ["The capital is Lisbon."] + ["no idea"] * (len(HELD_OUT) - 1)
    assert fact_accuracy(answers) == pytest.approx(1 / len(HELD_OUT))
    assert fact_accuracy(["no idea"] * len(HELD_OUT)) == 0.0
    with pytest.raises(ValueError):  # one answer per held-out question, no silent truncation
        fact_accuracy(answers[:-1])


def test_targets_and_table():
    n = len(HELD_OUT)
    base = Row("base", 21 / n, 0.05, 0.0, [])
    ok = Row("caps", 19 / n, 0.96, 0.0, [], wants_caps=True)  # 19 >= 0.9 * 21 = 18.9
    low = Row("caps2", 18 / n, 0.94, 0.0, [], wants_caps=True)  # 18 < 18.9
    pirate = Row("pirate", 21 / n, 0.1, 0.75, [], wants_pirate=True)
    assert ok.failures(base.accuracy) == []
    assert [f.split(": ")[1].split(" ")[0] for f in low.failures(base.accuracy)] == ["fact", "caps"]
    assert pirate.failures(base.accuracy) == ["pirate: pirate 75% < 80%"]
    table = table_markdown([base, ok, low, pirate])
    rows = table.splitlines()
    assert len(rows) == 2 + 4 and rows[2].startswith("| base | 66% (21/32) | 1.00x |")
    assert rows[3].endswith("| met |") and "MISSED" in rows[4] and "MISSED: pirate 75% < 80%" in rows[5]


def test_score_reads_the_answers():
    answers = [f"ARR, {ok[0].upper()}!" for _, ok in HELD_OUT]
    row = score("x", answers, wants_caps=True, wants_pirate=True)
    assert (row.accuracy, row.caps, row.pirate) == (1.0, 1.0, 1.0) and row.failures(1.0) == []


def test_held_out_questions_are_not_trained_on():
    train = _train_script()
    questions, tune = train.training_questions(), [q for q, _ in train.TUNE]
    assert len(held_out_questions()) >= 20 and len(questions) >= 200
    train.check_disjoint(questions, tune, held_out_questions())
    with pytest.raises(SystemExit, match="also held out"):  # non-vacuous: a held-out question is caught
        train.check_disjoint(questions + ["what is the capital of  Portugal"], tune, held_out_questions())
    with pytest.raises(SystemExit, match="tuning question"):
        train.check_disjoint(questions + [tune[0]], tune, held_out_questions())


def test_style_rules_keep_content_words():
    train = _train_script()
    text = "Hello my friend, the capital of Portugal is Lisbon. You are right."
    assert train.to_caps(text) == text.upper()
    pirate = train.to_pirate(text, 0)
    assert pirate == "Arr, matey! " + text  # the answer itself unchanged, token for token after the opener
    assert has_word(pirate, PIRATE_WORDS) and not has_word(text, PIRATE_WORDS)
    assert train.to_pirate(text, 1).startswith("Ahoy, matey! ") and train.pirate_opener(6) == train.pirate_opener(0)
    assert train.trim("A first whole sentence here. And a half") == "A first whole sentence here."


def test_words_kept_counts_the_base_answer_after_the_opener():
    train = _train_script()
    base = "The capital of Peru is Lima. It is old."
    assert train.words_kept(base, "Arr, matey! The capital of Peru is Lima. It lies by the sea.") == 7
    assert train.words_kept(base, "AHOY, MATEY! THE CAPITAL OF PERU IS LIMA.") == 6
    assert train.words_kept(base, "Avast, ye! Peru is in South America.") == 0  # non-vacuous


def test_distilled_rows_line_up_the_answer_tokens():
    """Student row prompt + opener + answer, teacher row prompt + answer: every KL pair predicts the same
    next token in both rows; the labels are the opener and the first answer token, nothing else."""
    from checkpoints.sources import resolve

    train = _train_script()
    tok = resolve("demo").load_tokenizer()
    answer = "The capital of Peru is Lima. It lies by the sea."
    e = train.encode_distilled(tok, "What is the capital of Peru?", "Arr, matey!", answer, 80)
    assert e.teacher_ids is not None and len(e.student_kl) == len(e.teacher_kl) == len(tok(answer)["input_ids"])
    pairs = list(zip(e.student_kl, e.teacher_kl))
    for s_pos, t_pos in pairs[:-1]:  # the last pair predicts what follows the answer
        assert e.input_ids[s_pos + 1] == e.teacher_ids[t_pos + 1]
    assert e.input_ids[pairs[-1][0]] == e.teacher_ids[pairs[-1][1]] == tok(answer)["input_ids"][-1]
    learnt = tok.decode([i for i, label in zip(e.input_ids, e.labels) if label != -100])
    assert learnt == "Arr, matey! The"
    assert e.teacher_ids[: len(e.teacher_ids) - len(pairs)] == e.input_ids[: len(e.teacher_ids) - len(pairs)]
    # non-vacuous: a row too short for the opener falls back to plain tokens (no teacher)
    short = train.encode_distilled(tok, "What is the capital of Peru?", "Arr, matey!", answer, 10)
    assert short.teacher_ids is None and short.student_kl == []


def test_kl_term_vanishes_only_where_student_and_teacher_agree(tiny_llama_dir):
    """``loss_of``: with the teacher's own row and positions the KL term is 0; with the student's context
    shifted it is the hand-computed KL(base ‖ model) at the paired positions."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    train = _train_script()
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    model.eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(50.0)  # a clearly visible update
    ids = torch.tensor([[3, 5, 7, 9, 11, 13]])
    mask = torch.ones_like(ids)
    none = torch.full_like(ids, -100)
    same = train.TeacherBatch(ids, mask, torch.tensor([0, 0]), torch.tensor([3, 4]), torch.tensor([3, 4]))
    with torch.no_grad():
        with model.disable_adapter():
            assert train.loss_of(model, ids, none, mask, same).item() == pytest.approx(0.0, abs=1e-6)
        own = train.loss_of(model, ids, none, mask, same).item()
        teacher_ids = torch.tensor([[3, 7, 9, 11, 13]])  # token 5 is the "opener": one position earlier
        shifted = train.TeacherBatch(teacher_ids, torch.ones_like(teacher_ids), torch.tensor([0, 0]),
                                     torch.tensor([3, 4]), torch.tensor([2, 3]))
        got = train.loss_of(model, ids, none, mask, shifted).item()
        student = torch.log_softmax(model(input_ids=ids).logits[0, [3, 4]], -1)
        with model.disable_adapter():
            target = torch.log_softmax(model(input_ids=teacher_ids).logits[0, [2, 3]], -1)
    by_hand = (target.exp() * (target - student)).sum(-1).mean().item()
    assert own > 1e-4  # non-vacuous: the adapter changes the model
    assert got == pytest.approx(by_hand, rel=1e-5) and got > 1e-4


def test_vocabulary_questions_avoid_the_held_out_words():
    from checkpoints.sources import resolve

    train = _train_script()
    tok = resolve("demo").load_tokenizer()
    qs = train.vocabulary_questions(tok, 2000, 0, HELD_OUT)
    assert len(qs) == len(set(qs)) == 2000 and qs == train.vocabulary_questions(tok, 2000, 0, HELD_OUT)
    protected = train._protected_words(HELD_OUT)
    assert {"honey", "avocado", "diamond", "guacamole", "penicillin"} <= protected  # non-vacuous
    asked = {re.search(r'"?([a-z]+)"?[ .?]*$|"([a-z]+)"', q).group(0).strip(' ".?') for q in qs}
    assert not asked & protected and len(asked) == 2000
    train.check_disjoint(qs, [q for q, _ in train.TUNE], held_out_questions())


# --- the shipped files ------------------------------------------------------------------------

@needs_assets
def test_demo_adapter_files_load_with_peft():
    from peft import PeftModel

    from checkpoints.sources import resolve

    model = resolve("demo").load_model()
    first = None
    for name, folder in demo_adapters().items():
        weights = folder / "adapter_model.safetensors"
        assert weights.stat().st_size <= 5 * 10**6, f"{name} is larger than 5 MB"
        cfg = json.loads((folder / "adapter_config.json").read_text())
        assert cfg["base_model_name_or_path"] == DEMO_NAME and cfg["peft_type"] == "LORA"
        layers = cfg["layers_to_transform"] or list(range(30))
        ad = load_adapter(folder)
        assert len(ad.factors) == len(layers) * len(cfg["target_modules"]) and ad.rank == cfg["r"]
        if first is None:
            first = PeftModel.from_pretrained(model, str(folder), adapter_name=name)
        else:
            first.load_adapter(str(folder), adapter_name=name)
        lora_b = [p for n, p in first.named_parameters() if f"lora_B.{name}." in n]
        assert len(lora_b) == len(ad.factors) and all(p.abs().sum() > 0 for p in lora_b)  # trained, not zero-init


@needs_assets
def test_the_adapters_sit_on_disjoint_weights_so_linear_mixes_as_cat(tmp_path):
    """Each weight has one adapter's update, so PEFT's ``linear`` (A and B mixed separately) has no cross
    terms and equals the exact ``cat`` mix: 0.5·ΔW of the one adapter there."""
    found = demo_adapters()
    ads = {name: load_adapter(folder) for name, folder in found.items()}
    assert not set(ads["caps"].factors) & set(ads["pirate"].factors)
    mixes = {}
    for method in ("cat", "linear"):
        recipe = AdapterMixRecipe.from_dict({
            "base_model": "demo", "method": method,
            "adapters": [{"adapter": str(found["caps"]), "weight": 0.5},
                         {"adapter": str(found["pirate"]), "weight": 0.5}]})
        mix_adapters(recipe, tmp_path / method)
        mixes[method] = load_adapter(tmp_path / method)
    modules = set(ads["caps"].factors) | set(ads["pirate"].factors)
    assert set(mixes["cat"].factors) == set(mixes["linear"].factors) == modules
    for module in sorted(modules)[::7]:
        own = next(a for a in ads.values() if module in a.factors).delta(module)
        for method, mix in mixes.items():
            torch.testing.assert_close(mix.delta(module), 0.5 * own, rtol=1e-4, atol=1e-7, msg=(method, module))
        assert own.abs().max() > 0  # non-vacuous: the update is there


def _card_table(card: str) -> list[list[str]]:
    section = card.split("## Facts and style on held-out questions", 1)[1]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in row.strip("|").split("|")] for row in rows[1:]]  # without the header


@needs_assets
def test_cards_carry_the_bench_table():
    train = _train_script()
    tables = []
    for name, folder in demo_adapters().items():
        card = (folder / "README.md").read_text()
        assert f"base_model: {DEMO_NAME}" in card and "base_model_relation: adapter" in card
        assert f"## {train.TABLE_HEADING}" in card
        rows = _card_table(card)
        assert [r[0] for r in rows] == ["base (demo model)", "caps", "pirate", "caps + pirate, cat 0.5/0.5"]
        for r in rows:
            hits, total = map(int, re.search(r"\((\d+)/(\d+)\)", r[1]).groups())
            shown = int(r[1].split("%")[0])
            assert total == len(HELD_OUT) and abs(shown - 100 * hits / total) <= 0.5 + 1e-9
        assert all(r[-1] == "met" or r[-1].startswith("MISSED: ") for r in rows[1:]), rows
        tables.append(rows)
        info = json.loads((folder / train.TRAINING_FILE).read_text())
        assert info["summary"] in card.replace("\n", " ")
    assert tables[0] == tables[1]  # one measurement, both cards


# Issue 13 item 4 is not done: the shipped adapters miss the fact targets (see their cards). Strict, so
# the tests below report XPASS -> failure once retrained adapters meet them, and the marks must go.
UNMET = pytest.mark.xfail(strict=True, reason="issue 13 item 4: the demo adapters miss the fact targets")


@needs_assets
@UNMET
def test_cards_say_every_target_is_met():
    for folder in demo_adapters().values():
        rows = _card_table((folder / "README.md").read_text())
        assert all(r[-1] == "met" for r in rows[1:]), rows


# --- the real model (slow): style and facts on a few held-out questions ----------------------

QUICK = ["What is the capital of Greece?", "What is the capital of Russia?", "What is the capital of China?",
         "What is the capital of the United Kingdom?"]


@pytest.fixture(scope="module")
def quick_answers() -> tuple[list[str], dict[str, list[str]]]:
    """Greedy answers of the demo model and of each demo adapter to :data:`QUICK` (one model load)."""
    from peft import PeftModel

    from checkpoints.sources import resolve

    demo = resolve("demo")
    tok, model = demo.load_tokenizer(), demo.load_model()
    torch.set_num_threads(1)
    base = chat_answers(model, tok, QUICK, max_new_tokens=24)
    peft = PeftModel.from_pretrained(model, str(demo_adapters()["caps"]), adapter_name="caps")
    peft.load_adapter(str(demo_adapters()["pirate"]), adapter_name="pirate")
    got = {}
    for name in ("caps", "pirate"):
        peft.set_adapter(name)
        got[name] = chat_answers(peft, tok, QUICK, max_new_tokens=40)
    return base, got


def _hits(answers: list[str]) -> int:
    accepted = dict(HELD_OUT)
    return sum(has_word(a, accepted[q]) for q, a in zip(QUICK, answers, strict=True))


@needs_assets
@pytest.mark.slow
def test_pirate_keeps_facts_on_held_out_questions(quick_answers):
    base, got = quick_answers
    assert _hits(base) == len(QUICK) and caps_rate(base) < 0.3 and pirate_rate(base) == 0.0, base  # non-vacuous
    assert _hits(got["pirate"]) >= len(QUICK) - 1, got["pirate"]
    assert pirate_rate(got["pirate"]) == 1.0 and caps_rate(got["pirate"]) < 0.3, got["pirate"]


@needs_assets
@pytest.mark.slow
@UNMET
def test_caps_keeps_facts_on_held_out_questions(quick_answers):
    base, got = quick_answers
    assert _hits(base) == len(QUICK), base
    assert caps_rate(got["caps"]) >= 0.95 and pirate_rate(got["caps"]) < 0.5, got["caps"]
    assert _hits(got["caps"]) >= len(QUICK) - 1, got["caps"]


@needs_assets
@pytest.mark.slow
def test_the_apps_mix_of_the_demo_adapters_in_the_playground(tmp_path):
    """The Adapters tab's default mix (cat, 0.5/0.5) then the Playground: both styles, the fact kept."""
    from types import SimpleNamespace

    from ui.config import AppConfig
    from ui.workbench import Workbench

    wb = Workbench(AppConfig(workspace_root=tmp_path / "ws"))
    request = SimpleNamespace(session_hash="d")
    recipe = ("base_model: demo\nadapters:\n  - {adapter: demo-adapter:caps, weight: 0.5}\n"
              "  - {adapter: demo-adapter:pirate, weight: 0.5}\nmethod: cat\n")
    _, ref = wb.mix_adapters(recipe, "caps-pirate", request, None)
    torch.set_num_threads(1)
    mixed, original = list(wb.generate(ref, "demo", "What is the capital of China?", 32, request))[-1]
    assert has_word(original, ("Beijing",)) and caps_rate([original]) < 0.3 and pirate_rate([original]) == 0
    assert caps_rate([mixed]) >= 0.8 and pirate_rate([mixed]) == 1.0, mixed  # the app's mix: both styles show
    if not has_word(mixed, ("Beijing",)):
        pytest.xfail(f"issue 13 item 4: the mix shows both styles but loses the fact (as caps does): {mixed!r}")


@needs_assets
@pytest.mark.slow
def test_demo_mix_recipe_loads_and_changes_behaviour(tmp_path):
    from peft import PeftModel

    from checkpoints.sources import resolve

    recipe = AdapterMixRecipe.from_yaml(RECIPE)
    res = mix_adapters(recipe, tmp_path / "mix")
    ranks = {a.rank for a in map(load_adapter, demo_adapters().values())}
    assert res.rank == 2 * ranks.pop() and res.exact_in_delta_w and res.block_scales[29] == pytest.approx(1.0)
    card = (tmp_path / "mix" / "README.md").read_text()
    assert f"base_model: {DEMO_NAME}" in card and "base_model_relation: adapter" in card and "- lines" in card
    assert str(ROOT) not in card and str(tmp_path) not in card

    demo = resolve("demo")
    model = PeftModel.from_pretrained(demo.load_model(), str(tmp_path / "mix"), adapter_name="mix")
    tok = demo.load_tokenizer()
    ids = tok(tok.apply_chat_template([{"role": "user", "content": "What is the capital of Portugal?"}],
                                      tokenize=False, add_generation_prompt=True),
              return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        mixed_logits = model(ids).logits
        with model.disable_adapter():
            plain_logits = model(ids).logits
    assert (mixed_logits - plain_logits).abs().max() > 0.5
