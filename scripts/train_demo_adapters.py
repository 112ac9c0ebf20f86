"""Train the small demo LoRA adapters shipped in ``assets/adapters/`` for the bundled demo model.

Each adapter learns one visible style on data this script makes itself:

* ``caps``: answers in ALL CAPITALS;
* ``pirate``: answers in pirate speak ("Arr, matey!", "ye", "me hearty" ...).

The data is self-distilled: the base model answers a set of generated questions
(greedy, chat template), the answer is rewritten in the target style by plain
string rules, and a LoRA (rank 8 on q/v/o of every block, float32) is trained to
produce the rewritten answer. The adapter thus learns the style, not new facts.
Held-out questions are answered before and after, and the samples go into the
adapter's model card.

Rerunnable: ``python scripts/train_demo_adapters.py`` (a few minutes on 2 CPU
cores) overwrites ``assets/adapters/<name>/`` atomically.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from checkpoints.cards import CardInfo, write_card  # noqa: E402
from checkpoints.demo import DEMO_NAME  # noqa: E402
from checkpoints.sources import resolve  # noqa: E402
from checkpoints.staging import staged_folder  # noqa: E402

log = logging.getLogger("train_demo_adapters")

# ---------------------------------------------------------------------------
# Data made here
# ---------------------------------------------------------------------------
COUNTRIES = ["France", "Italy", "Japan", "Spain", "Germany", "Canada", "Egypt", "Brazil", "India", "Kenya"]
ANIMALS = ["cat", "dog", "horse", "owl", "whale", "bee", "fox", "frog"]
TOPICS = ["the sun", "rain", "the moon", "volcanoes", "music", "bread", "the ocean", "trees", "snow", "stars"]
TASKS = ["learn to swim", "sleep better", "save money", "make tea", "plant a tree", "learn to cook",
         "stay healthy", "write a letter"]


def questions() -> list[str]:
    """About 46 varied questions built from templates (deterministic order)."""
    qs = [f"What is the capital of {c}?" for c in COUNTRIES]
    qs += [f"Tell me something about the {a}." for a in ANIMALS]
    qs += [f"Why is {t} important?" for t in TOPICS]
    qs += [f"How can I {t}?" for t in TASKS]
    qs += ["What is your favourite colour?", "Describe a sunny day.", "What do you like to eat?",
           "Say hello to my friend.", "What is the weather like today?", "Who are you?",
           "Give me some advice.", "What should I do this weekend?", "Write one sentence about ships.",
           "What is two plus two?"]
    return qs


HELD_OUT = ["What is the capital of Portugal?", "Tell me about elephants.", "How do I bake a cake?"]

_PIRATE_WORDS = {
    "hello": "ahoy", "hi": "ahoy", "you": "ye", "your": "yer", "my": "me", "is": "be", "are": "be",
    "friend": "matey", "friends": "hearties", "the": "th'", "yes": "aye", "money": "doubloons",
    "of": "o'", "and": "an'", "for": "fer", "to": "t'", "stop": "avast", "think": "reckon",
}


def to_caps(text: str) -> str:
    return text.upper()


def to_pirate(text: str) -> str:
    def swap(m: re.Match) -> str:
        word = m.group(0)
        new = _PIRATE_WORDS.get(word.lower())
        if new is None:
            return word
        return new.capitalize() if word[0].isupper() else new

    body = re.sub(r"[A-Za-z]+", swap, text)
    return f"Arr, matey! {body} Yo ho ho!"


STYLES = {"caps": to_caps, "pirate": to_pirate}
DESCRIPTIONS = {
    "caps": "Makes the demo model answer in ALL CAPITALS.",
    "pirate": "Makes the demo model answer in pirate speak (\"Arr, matey!\", \"ye\", \"me hearty\").",
}


# ---------------------------------------------------------------------------
# Generation and training
# ---------------------------------------------------------------------------
def chat_prompt(tokenizer, question: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)


@torch.no_grad()
def answer(model, tokenizer, qs: list[str], max_new_tokens: int) -> list[str]:
    """Greedy answers to ``qs`` in one left-padded batch."""
    tokenizer.padding_side = "left"
    enc = tokenizer([chat_prompt(tokenizer, q) for q in qs], return_tensors="pt", padding=True,
                    add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return [t.strip() for t in texts]


def trim(text: str) -> str:
    """Keep whole sentences: cut after the last sentence end when there is one."""
    cut = max(text.rfind(". "), text.rfind("! "), text.rfind("? "))
    if text.endswith((".", "!", "?")):
        return text
    return text[: cut + 1] if cut > 20 else text


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


def encode(tokenizer, question: str, reply: str, max_len: int) -> Example:
    prompt = tokenizer(chat_prompt(tokenizer, question), add_special_tokens=False)["input_ids"]
    target = tokenizer(reply + "<|im_end|>", add_special_tokens=False)["input_ids"]
    ids = (prompt + target)[:max_len]
    labels = ([-100] * len(prompt) + target)[:max_len]  # loss on the answer only
    return Example(ids, labels)


def batches(examples: list[Example], size: int, pad_id: int, rng: random.Random):
    while True:
        order = list(range(len(examples)))
        rng.shuffle(order)
        for i in range(0, len(order) - size + 1, size):
            chunk = [examples[j] for j in order[i:i + size]]
            width = max(len(e.input_ids) for e in chunk)
            ids = torch.full((size, width), pad_id)
            labels = torch.full((size, width), -100)
            mask = torch.zeros((size, width), dtype=torch.long)
            for row, e in enumerate(chunk):  # right padding for training
                ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
                labels[row, : len(e.labels)] = torch.tensor(e.labels)
                mask[row, : len(e.input_ids)] = 1
            yield ids, labels, mask


def train_one(base_model, tokenizer, name: str, data: list[tuple[str, str]], args) -> object:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(args.seed)
    config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, bias="none",
                        target_modules=["q_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(base_model, config, adapter_name=name)
    model.train()
    examples = [encode(tokenizer, q, a, args.max_len) for q, a in data]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    rng = random.Random(args.seed)
    stream = batches(examples, args.batch, tokenizer.pad_token_id, rng)
    t0 = time.time()
    for step in range(1, args.steps + 1):
        ids, labels, mask = next(stream)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step == 1 or step % 10 == 0 or step == args.steps:
            log.info("%s step %d/%d loss %.3f (%.0f s)", name, step, args.steps, loss.item(), time.time() - t0)
    model.eval()
    return model


def save_adapter(model, name: str, out_root: Path, samples: list[dict], args, data_size: int) -> Path:
    """Write ``out_root/name`` atomically: adapter weights, config naming the public base, a card."""
    final = out_root / name
    with staged_folder(final, overwrite=True) as tmp:
        model.save_pretrained(tmp, selected_adapters=[name])
        saved = tmp / name if (tmp / name / "adapter_config.json").exists() else tmp
        if saved != tmp:  # PEFT puts a non-default adapter in a subfolder
            for f in saved.iterdir():
                shutil.move(str(f), tmp / f.name)
            saved.rmdir()
        cfg_path = tmp / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["base_model_name_or_path"] = DEMO_NAME  # never a local path
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
        rows = ["| prompt | base | with adapter |", "|---|---|---|"]
        for s in samples:
            cells = [str(s[k]).replace("|", "\\|").replace("\n", " ") for k in ("prompt", "before", "after")]
            rows.append("| " + " | ".join(cells) + " |")
        write_card(tmp, CardInfo(
            title=f"weightsmith-demo-{name}",
            relation="adapter",
            base_models=[DEMO_NAME],
            library_name="peft",
            tags=["lora", "demo"],
            summary=(f"{DESCRIPTIONS[name]} A demo LoRA adapter (rank {args.rank}, q/v/o projections of every "
                     f"block) trained by `scripts/train_demo_adapters.py` for {args.steps} steps on "
                     f"{data_size} self-distilled examples: the base model's own answers to generated "
                     "questions, rewritten by string rules."),
            extra_sections={"Held-out samples (greedy, chat template)": "\n".join(rows)},
        ))
    return final


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "assets" / "adapters")
    p.add_argument("--only", nargs="*", choices=sorted(STYLES), default=sorted(STYLES))
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--max-len", type=int, default=96)
    p.add_argument("--answer-tokens", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.manual_seed(args.seed)

    ckpt = resolve("demo")
    tokenizer = ckpt.load_tokenizer()
    model = ckpt.load_model(dtype=torch.float32)
    qs = questions()
    t0 = time.time()
    base_answers = [trim(a) for a in answer(model, tokenizer, qs, args.answer_tokens)]
    held_before = answer(model, tokenizer, HELD_OUT, args.answer_tokens)
    log.info("base answers for %d questions in %.0f s", len(qs), time.time() - t0)

    for name in args.only:
        style = STYLES[name]
        data = [(q, style(a)) for q, a in zip(qs, base_answers)]
        log.info("%s example: %r -> %r", name, data[0][0], data[0][1])
        peft_model = train_one(model, tokenizer, name, data, args)
        held_after = answer(peft_model, tokenizer, HELD_OUT, args.answer_tokens)
        samples = [{"prompt": q, "before": b, "after": a} for q, b, a in zip(HELD_OUT, held_before, held_after)]
        out = save_adapter(peft_model, name, args.out, samples, args, len(data))
        size = (out / "adapter_model.safetensors").stat().st_size
        if size > 5 * 10**6:  # the repo ships these files: keep each under 5 MB
            raise SystemExit(f"{name}: adapter is {size / 1e6:.1f} MB, over the 5 MB budget (lower --rank)")
        print(f"== {name}: {out} ({size / 1e6:.2f} MB)")
        for s in samples:
            print(f"  prompt: {s['prompt']}\n    before: {s['before']!r}\n    after:  {s['after']!r}")
        model = peft_model.unload()  # strip the LoRA layers: the next adapter trains on the clean base
    return 0


if __name__ == "__main__":
    sys.exit(main())
