"""Do the demo adapters show what mixing does? Facts and style on held-out questions.

Measures the demo model, the two bundled adapters (``assets/adapters/caps`` and
``assets/adapters/pirate``) and their 50/50 mix, made by the library exactly as the
app's Adapters tab makes it (:func:`merging.adapters.mix_adapters`, method ``cat``,
weights 0.5/0.5, no LiNeS), on :data:`HELD_OUT`: factual questions written for this
bench and never used by ``scripts/train_demo_adapters.py`` (it refuses to run if one
of its questions is here).

Every answer is greedy, after the chat template the Playground uses, at most
:data:`ANSWER_TOKENS` new tokens. Definitions:

* **fact accuracy**: the share of questions whose answer contains one of the question's
  accepted words as a whole word, case-insensitive ("Lisbon" matches "LISBON,");
* **caps**: upper-case letters / all letters, over all answers pooled;
* **pirate**: the share of answers holding at least one word of :data:`PIRATE_WORDS`
  (whole word, case-insensitive).

Targets (the issue's): each adapter and the mix keep fact accuracy >= 0.9 x the base's
(within 10 % of it); caps >= 95 % for caps and the mix; pirate >= 80 % for pirate and the mix.

    .venv/bin/python bench/demo_adapters.py            # prints the table, exit 1 if a target is missed
    .venv/bin/python bench/demo_adapters.py --answers  # and every answer
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# The style scores are the library's (the Evaluate tab's style task uses the same definitions).
from evaluation.style import PIRATE_WORDS, caps_rate, has_word, pirate_rate  # noqa: E402,F401

ANSWER_TOKENS = 64
MIX_WEIGHTS = (0.5, 0.5)
FACT_RATIO = 0.9  # an adapter keeps >= 90 % of the base's fact accuracy
CAPS_TARGET = 0.95
PIRATE_TARGET = 0.80

# Written for this bench (general knowledge, no external source). Question -> accepted answer words.
HELD_OUT: list[tuple[str, tuple[str, ...]]] = [
    ("What is the capital of Portugal?", ("Lisbon",)),
    ("What is the capital of Greece?", ("Athens",)),
    ("What is the capital of Russia?", ("Moscow",)),
    ("What is the capital of the United Kingdom?", ("London",)),
    ("What is the capital of China?", ("Beijing",)),
    ("What is the capital of Australia?", ("Canberra",)),
    ("Who wrote Romeo and Juliet?", ("Shakespeare",)),
    ("Which planet is known as the Red Planet?", ("Mars",)),
    ("What is the largest planet in our solar system?", ("Jupiter",)),
    ("Which planet is closest to the Sun?", ("Mercury",)),
    ("What is the chemical symbol for gold?", ("Au",)),
    ("What gas do plants absorb from the air to make food?", ("carbon", "CO2")),
    ("How many days are there in a week?", ("seven", "7")),
    ("At what temperature in degrees Celsius does water freeze?", ("0", "zero")),
    ("At what temperature in degrees Celsius does water boil?", ("100",)),
    ("What is the largest ocean on Earth?", ("Pacific",)),
    ("Who painted the Mona Lisa?", ("Leonardo", "Vinci")),
    ("What is the tallest mountain in the world?", ("Everest",)),
    ("Which animal is known as the king of the jungle?", ("lion", "lions")),
    ("What language is mainly spoken in Brazil?", ("Portuguese",)),
    ("What is the longest river in Africa?", ("Nile",)),
    ("Who was the first president of the United States?", ("Washington",)),
    ("How many legs does a spider have?", ("eight", "8")),
    ("What is the main ingredient of guacamole?", ("avocado", "avocados")),
    ("What color is the sky on a clear day?", ("blue",)),
    ("What is the currency of Japan?", ("yen",)),
    ("On which continent is Egypt?", ("Africa",)),
    ("Who discovered penicillin?", ("Fleming",)),
    ("In which country are the pyramids of Giza?", ("Egypt",)),
    ("What is the hardest natural substance?", ("diamond", "diamonds")),
    ("What do bees make from nectar?", ("honey",)),
    ("What is the freezing form of water called?", ("ice",)),
]

def normalize_question(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def held_out_questions() -> list[str]:
    return [q for q, _ in HELD_OUT]


def fact_accuracy(answers: list[str]) -> float:
    return sum(has_word(a, accepted) for a, (_, accepted) in zip(answers, HELD_OUT, strict=True)) / len(HELD_OUT)


def chat_prompt(tokenizer, question: str) -> str:
    """The Playground's wrapping (ui.handlers_models.generate with chat on)."""
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)


@torch.no_grad()
def chat_answers(model, tokenizer, questions: list[str], max_new_tokens: int = ANSWER_TOKENS,
                 batch: int = 64) -> list[str]:
    """Greedy answers to ``questions``, in left-padded batches (same tokens as one by one)."""
    tokenizer.padding_side = "left"
    out_texts: list[str] = []
    for i in range(0, len(questions), batch):
        chunk = questions[i:i + batch]
        enc = tokenizer([chat_prompt(tokenizer, q) for q in chunk], return_tensors="pt", padding=True,
                        add_special_tokens=False)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        out_texts += [t.strip() for t in texts]
    return out_texts


@dataclass
class Row:
    """One model's scores on :data:`HELD_OUT`."""

    name: str
    accuracy: float
    caps: float
    pirate: float
    answers: list[str]
    wants_caps: bool = False
    wants_pirate: bool = False

    def failures(self, base_accuracy: float) -> list[str]:
        out = []
        if self.accuracy < FACT_RATIO * base_accuracy - 1e-9:
            out.append(f"{self.name}: fact accuracy {self.accuracy:.0%} < {FACT_RATIO:.0%} of the base's "
                       f"{base_accuracy:.0%}")
        if self.wants_caps and self.caps < CAPS_TARGET:
            out.append(f"{self.name}: caps {self.caps:.1%} < {CAPS_TARGET:.0%}")
        if self.wants_pirate and self.pirate < PIRATE_TARGET:
            out.append(f"{self.name}: pirate {self.pirate:.0%} < {PIRATE_TARGET:.0%}")
        return out


def score(name: str, answers: list[str], *, wants_caps: bool = False, wants_pirate: bool = False) -> Row:
    return Row(name, fact_accuracy(answers), caps_rate(answers), pirate_rate(answers), answers,
               wants_caps, wants_pirate)


def table_markdown(rows: list[Row]) -> str:
    """The table the bench prints and the cards carry."""
    base = rows[0].accuracy
    lines = ["| model | fact accuracy | vs base | caps (upper-case letters) | pirate (answers with pirate words) "
             "| targets |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r.accuracy / base:.2f}x" if base else "–"
        verdict = "–" if r is rows[0] else ("met" if not r.failures(base) else "MISSED: " + "; ".join(
            f.split(": ", 1)[1] for f in r.failures(base)))
        lines.append(f"| {r.name} | {r.accuracy:.0%} ({round(r.accuracy * len(HELD_OUT))}/{len(HELD_OUT)}) "
                     f"| {ratio} | {r.caps:.1%} | {r.pirate:.0%} | {verdict} |")
    return "\n".join(lines)


def measure(adapters: dict[str, Path], *, max_new_tokens: int = ANSWER_TOKENS) -> list[Row]:
    """Base, each adapter and the 50/50 ``cat`` mix (made by :func:`merging.adapters.mix_adapters`)."""
    from peft import PeftModel

    from checkpoints.sources import resolve
    from merging.adapters import AdapterMixRecipe, mix_adapters

    demo = resolve("demo")
    tokenizer = demo.load_tokenizer()
    model = demo.load_model(dtype=torch.float32)
    questions = held_out_questions()
    rows = [score("base (demo model)", chat_answers(model, tokenizer, questions, max_new_tokens))]
    with tempfile.TemporaryDirectory() as tmp:
        recipe = AdapterMixRecipe.from_dict({
            "base_model": "demo",
            "adapters": [{"adapter": str(adapters["caps"]), "weight": MIX_WEIGHTS[0]},
                         {"adapter": str(adapters["pirate"]), "weight": MIX_WEIGHTS[1]}],
            "method": "cat",
        })
        mix_dir = Path(tmp) / "mix"
        mix_adapters(recipe, mix_dir)
        peft_model = PeftModel.from_pretrained(model, str(adapters["caps"]), adapter_name="caps")
        peft_model.load_adapter(str(adapters["pirate"]), adapter_name="pirate")
        peft_model.load_adapter(str(mix_dir), adapter_name="mix")
        peft_model.eval()
        for name, label, caps, pirate in (("caps", "caps", True, False), ("pirate", "pirate", False, True),
                                          ("mix", "caps + pirate, cat 0.5/0.5", True, True)):
            peft_model.set_adapter(name)
            rows.append(score(label, chat_answers(peft_model, tokenizer, questions, max_new_tokens),
                              wants_caps=caps, wants_pirate=pirate))
    return rows


def main(argv: list[str] | None = None) -> int:
    from checkpoints.demo_adapters import demo_adapters

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--answers", action="store_true", help="print every answer too")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = measure(demo_adapters())
    if args.answers:
        for i, (q, _) in enumerate(HELD_OUT):
            print(f"\n{q}")
            for r in rows:
                print(f"  [{r.name}] {r.answers[i]!r}")
    print(table_markdown(rows))
    failures = [f for r in rows[1:] for f in r.failures(rows[0].accuracy)]
    for f in failures:
        print("target missed:", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
