"""Train the small demo LoRA adapters shipped in ``assets/adapters/`` for the bundled demo model.

Each adapter learns one visible style, and nothing else:

* ``caps``: answers in ALL CAPITALS;
* ``pirate``: answers open in pirate speak ("Arr, matey!", "Ahoy, matey!", "Avast, ye!").

The data is self-distilled: the demo model answers about 230 varied questions made here
(greedy, the Playground's chat template), each answer is rewritten in the target style by
plain string rules that leave content words alone (caps: ``str.upper``; pirate: an opener
before the unchanged answer), and a LoRA (rank 8, float32, seeded; blocks and projections per
adapter in :data:`SETTINGS`, disjoint between the two) learns to produce the rewritten answer
(loss on the answer tokens only). Because the target is the model's own answer, the adapter
learns the style, not new facts. Pirate also learns, on a share of its steps, to open with the
upper-cased opener while caps is on and both run at strength 0.5: the app's 50/50 mix.

The questions come in three disjoint sets: training, a tuning split with checkable answers
(:data:`TUNE`, used to choose the settings: ``--eval-tune``), and the held-out questions of
``bench/demo_adapters.py`` (the script stops if a training or tuning question is one of them).
Each step scales the LoRA by a factor drawn from ``--scale-choices``, so the style survives
being mixed at weight 0.5 (the app's default mix).

After training, the bench measures base, caps, pirate and their 50/50 ``cat`` mix on the
held-out questions; the table goes into each adapter's model card (``--cards-only`` redoes
just that). ``training.json`` in each folder records the settings.

Rerunnable: ``python scripts/train_demo_adapters.py`` overwrites ``assets/adapters/<name>/``
atomically (time: see the README's demo adapters paragraph).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.demo_adapters import (  # noqa: E402
    HELD_OUT,
    chat_answers,
    chat_prompt,
    has_word,
    held_out_questions,
    measure,
    normalize_question,
    table_markdown,
)
from checkpoints.cards import CardInfo, write_card  # noqa: E402
from checkpoints.demo import DEMO_NAME  # noqa: E402
from checkpoints.sources import resolve  # noqa: E402
from checkpoints.staging import staged_folder  # noqa: E402

log = logging.getLogger("train_demo_adapters")

# ---------------------------------------------------------------------------
# Questions made here. None of their subjects is a held-out question's.
# ---------------------------------------------------------------------------
COUNTRIES = ["India", "Kenya", "Mexico", "Argentina", "Sweden", "Norway", "Poland", "Ireland", "Turkey", "Peru",
             "Chile", "Cuba", "Thailand", "Vietnam", "Austria", "Belgium", "the Netherlands", "Switzerland",
             "Denmark", "Finland", "Hungary", "Nigeria", "Morocco", "South Korea", "Indonesia", "Iran", "Colombia",
             "Ukraine", "Romania", "New Zealand", "Pakistan", "Israel", "Ghana", "Iceland", "Scotland"]
ANIMALS = ["cat", "dog", "horse", "owl", "fox", "frog", "elephant", "giraffe", "penguin", "dolphin", "shark",
           "eagle", "rabbit", "turtle", "snake", "zebra", "kangaroo", "wolf", "bear", "monkey", "octopus", "camel",
           "parrot", "butterfly", "crocodile", "hedgehog", "goat", "cow", "chicken", "deer"]
CONCEPTS = ["gravity", "photosynthesis", "democracy", "electricity", "a volcano", "an atom", "the internet",
            "a rainbow", "an earthquake", "a computer", "a black hole", "DNA", "the weather", "a vaccine",
            "inflation", "a poem", "a novel", "an orchestra", "a bridge", "a library", "friendship", "history",
            "mathematics", "chemistry", "biology", "geography", "a telescope", "a microscope", "a battery",
            "a hurricane", "a glacier", "a desert", "a forest", "a river", "an island", "a museum", "a recipe",
            "a calendar", "a map", "a compass", "the economy", "a language", "philosophy", "a muscle", "a bone",
            "sleep", "energy", "a magnet", "sound", "light"]
TASKS = ["learn to swim", "sleep better", "save money", "make tea", "plant a tree", "learn to cook",
         "stay healthy", "write a letter", "learn a new language", "make friends", "study for an exam",
         "ride a bicycle", "make pancakes", "clean my room", "start running", "grow tomatoes", "paint a picture",
         "take a good photo", "reduce stress", "read more books", "train a puppy", "fix a flat tire",
         "write a poem", "keep a plant alive", "prepare for a job interview"]
TOPICS = ["the sun", "rain", "the moon", "music", "bread", "the ocean", "trees", "snow", "sleep", "exercise",
          "reading", "water", "education", "family", "art", "science", "recycling", "kindness", "forests", "rivers"]
PEOPLE = ["Isaac Newton", "Marie Curie", "Charles Darwin", "Napoleon", "Cleopatra", "Mozart", "Beethoven",
          "Galileo", "Nelson Mandela", "Gandhi", "Abraham Lincoln", "Queen Victoria", "Julius Caesar",
          "Aristotle", "Plato", "Jane Austen", "Charles Dickens", "Vincent van Gogh", "Pablo Picasso",
          "Christopher Columbus"]
THINGS = ["a banana", "a cherry", "snow", "a tomato", "coal", "an orange", "a lemon", "milk", "a strawberry",
          "chocolate", "a carrot", "the night sky"]
CHAT = ["What is your favourite colour?", "Describe a sunny day.", "What do you like to eat?",
        "Say hello to my friend.", "What is the weather like today?", "Who are you?", "Give me some advice.",
        "What should I do this weekend?", "Write one sentence about ships.", "What is two plus two?",
        "Tell me a fun fact.", "What makes a good friend?", "Describe your ideal holiday.",
        "What is the best time of day?", "Can you help me?", "Tell me a short story.", "What is a good hobby?",
        "How are you today?", "What should I cook for dinner?", "Describe a busy city street."]


def training_questions() -> list[str]:
    """About 240 varied questions (deterministic order)."""
    qs = [f"What is the capital of {c}?" for c in COUNTRIES]
    qs += [f"What language is spoken in {c}?" for c in COUNTRIES[:15]]
    qs += [f"Tell me about the {a}." for a in ANIMALS]
    qs += [f"What is {c}?" for c in CONCEPTS]
    qs += [f"How can I {t}?" for t in TASKS]
    qs += [f"Why is {t} important?" for t in TOPICS]
    qs += [f"Who was {p}?" for p in PEOPLE]
    qs += [f"What color is {t}?" for t in THINGS]
    return qs + CHAT


# Words the held-out and tuning questions ask about or accept: never a vocabulary question's subject.
def _protected_words(held_out: list[tuple[str, tuple[str, ...]]]) -> set[str]:
    words: set[str] = set()
    for q, accepted in list(held_out) + list(TUNE):
        words |= set(normalize_question(q).split()) | {w.lower() for a in accepted for w in a.split()}
    return words


def vocabulary_questions(tokenizer, n: int, seed: int, held_out: list[tuple[str, tuple[str, ...]]]) -> list[str]:
    """``n`` more questions, each about one lower-case word of the tokenizer's own vocabulary (whole-word
    tokens, 6+ letters), drawn with ``seed``. Why: a style that rewrites every word (caps) must learn it
    for words it has never been shown, so its data needs many different words, not more of the same
    questions; the vocabulary is the one word list this machine has that is neither a bench's data nor a
    download. Words the held-out or tuning questions ask about or accept are left out."""
    protected = _protected_words(held_out)
    words = sorted({t[1:] for t in tokenizer.get_vocab() if t.startswith("\u0120") and t[1:].isalpha()
                    and t[1:].islower() and len(t) > 6 and t[1:] not in protected})
    templates = ["What does the word \"{}\" mean?", "Use the word \"{}\" in a sentence.",
                 "Tell me something about {}."]
    rng = random.Random(seed)
    return [templates[i % len(templates)].format(w) for i, w in enumerate(rng.sample(words, min(n, len(words))))]


# The tuning split: checkable questions (accepted words) to choose LR and epochs; never trained on.
TUNE: list[tuple[str, tuple[str, ...]]] = [
    ("What is the capital of Germany?", ("Berlin",)),
    ("What is the capital of Italy?", ("Rome",)),
    ("What is the capital of Spain?", ("Madrid",)),
    ("What is the capital of Japan?", ("Tokyo",)),
    ("What is the capital of France?", ("Paris",)),
    ("What is the capital of Canada?", ("Ottawa",)),
    ("What planet do we live on?", ("Earth",)),
    ("How many hours are there in a day?", ("24", "twenty-four")),
    ("What is the opposite of hot?", ("cold",)),
    ("What is the largest mammal on Earth?", ("whale",)),
    ("What color is grass?", ("green",)),
    ("Who invented the light bulb?", ("Edison",)),
    ("Who developed the theory of relativity?", ("Einstein",)),
    ("What is the largest desert in the world?", ("Sahara", "Antarctic", "Antarctica")),
    ("How many continents are there?", ("seven", "7")),
    ("What is the fastest land animal?", ("cheetah",)),
    ("Which organ pumps blood through the body?", ("heart",)),
    ("What is the star at the center of our solar system?", ("Sun",)),
    ("What do you call a baby cat?", ("kitten",)),
    ("Which metal is liquid at room temperature?", ("mercury",)),
]

# ---------------------------------------------------------------------------
# Styles: string rules that leave content words alone
# ---------------------------------------------------------------------------
# Openers only: the answer after them is the demo model's own, token for token (facts kept by construction).
_PIRATE_OPEN = ["Arr, matey!", "Ahoy, matey!", "Aye, me hearty!", "Arr!", "Ahoy there, matey!", "Avast, ye!"]


def to_caps(text: str, i: int = 0) -> str:
    return text.upper()


def pirate_opener(i: int) -> str:
    return _PIRATE_OPEN[i % len(_PIRATE_OPEN)]


def to_pirate(text: str, i: int = 0) -> str:
    """A pirate opener (chosen by ``i``, so the data is fixed) before the unchanged answer."""
    return f"{pirate_opener(i)} {text}"


STYLES = {"caps": to_caps, "pirate": to_pirate}

# Per adapter, chosen on the tuning split (TUNE, --eval-tune); a flag on the command line overrides.
# The two adapters sit on disjoint projections, so a mix adds each one's update to its own weights
# (``cat`` and ``linear`` then agree: no cross terms B_i A_j). Caps must also *read* its own upper-case
# answer as it writes it, so it needs the first blocks too (upper blocks only: 0 % facts on the tuning
# split). Pirate only adds an opener: the upper blocks suffice, and the backward pass stops at the lowest
# LoRA block (less compute). ``eos``: end each target with EOS (off for pirate: where the demo model stops
# is left to it, so its answers keep their length). ``partner``: some steps (``partner_share``) run with
# the partner adapter active too, both at strength 0.5 (the app's 50/50 ``cat`` mix), and learn the
# upper-cased opener there, so the mix shows both styles.
SETTINGS: dict[str, dict] = {
    "caps": {"targets": ["v_proj", "o_proj", "down_proj"], "layers": list(range(30)), "epochs": 1, "lr": 2e-3,
             "first_sentence": 0, "eos": 1, "max_len": 128, "partner": None, "partner_share": 0.0,
             "distill": 0, "extra_questions": 0},
    # Pirate learns the answer after its opener from the base's distributions over the whole answer
    # (distill, max_len 128) for 3 epochs: on the tuning split the answers then keep 5.5 words of the
    # base's answer from its start, against 3.4 after 1 epoch (and the opener in 100 % of answers).
    "pirate": {"targets": ["q_proj", "k_proj", "gate_proj", "up_proj"], "layers": list(range(22, 30)),
               "epochs": 3, "lr": 1e-3, "first_sentence": 0, "eos": 0, "max_len": 128, "partner": "caps",
               "partner_share": 0.3, "distill": 1, "extra_questions": 0},
}


def _span(layers: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    parts, start = [], None
    for i, n in enumerate(layers):
        if start is None:
            start = n
        if i + 1 == len(layers) or layers[i + 1] != n + 1:
            parts.append(f"{start}-{n}" if n != start else f"{n}")
            start = None
    return ", ".join(parts)
DESCRIPTIONS = {
    "caps": "Makes the demo model answer in ALL CAPITALS, keeping what it says.",
    "pirate": "Makes the demo model open its answers in pirate speak (\"Arr, matey!\", \"Ahoy, matey!\", "
              "\"Avast, ye!\"), keeping what it says.",
}


DISTILLED = ("the answer after the opener was learnt from the demo model's own next-token distributions given "
             "the question alone (KL divergence over the whole answer), so it says what the model would have said")


def check_disjoint(train: list[str], tune: list[str], held_out: list[str]) -> None:
    """Training, tuning and held-out questions must not share a question."""
    seen = {normalize_question(q) for q in held_out}
    for name, qs in (("training", train), ("tuning", tune)):
        clash = [q for q in qs if normalize_question(q) in seen]
        if clash:
            raise SystemExit(f"{name} question(s) also held out by bench/demo_adapters.py: {clash}")
    if {normalize_question(q) for q in train} & {normalize_question(q) for q in tune}:
        raise SystemExit("a tuning question is also a training question")


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------
def first_sentence(text: str) -> str:
    """The answer's first sentence (where these short answers put the fact)."""
    for i, c in enumerate(text):
        if c in ".!?" and (i + 1 == len(text) or text[i + 1] == " ") and i > 20:
            return text[: i + 1]
    return text


def trim(text: str) -> str:
    """Keep whole sentences: cut after the last sentence end when there is one."""
    if text.endswith((".", "!", "?")):
        return text
    cut = max(text.rfind(". "), text.rfind("! "), text.rfind("? "))
    return text[: cut + 1] if cut > 20 else text


@dataclass
class Example:
    """One training row. With ``teacher_ids``, the loss at ``student_kl`` is the KL divergence from the
    base model's next-token distribution at ``teacher_kl`` in ``teacher_ids`` (same count, in order)."""

    input_ids: list[int]
    labels: list[int]
    teacher_ids: list[int] | None = None
    student_kl: list[int] = field(default_factory=list)
    teacher_kl: list[int] = field(default_factory=list)


def encode(tokenizer, question: str, reply: str, max_len: int, eos: bool = True) -> Example:
    prompt = tokenizer(chat_prompt(tokenizer, question), add_special_tokens=False)["input_ids"]
    target = tokenizer(reply + (tokenizer.eos_token if eos else ""), add_special_tokens=False)["input_ids"]
    ids = (prompt + target)[:max_len]
    labels = ([-100] * len(prompt) + target)[:max_len]  # loss on the answer only
    return Example(ids, labels)


def encode_distilled(tokenizer, question: str, opener: str, answer: str, max_len: int) -> Example:
    """The opener learnt from its tokens, the answer after it from the base model's distributions.

    Student row: prompt + opener + answer; teacher row: prompt + answer, as the base model saw it. Past
    the first answer token the two rows hold the same answer tokens (the tokenizer splits at the space),
    so each student position that predicts answer token j (and the one after the last) is matched with
    the teacher position predicting the same token. Why KL and not the greedy tokens: the whole
    distribution says far more per token about what the model would have said, and the goal is that
    after the opener it says just that. A row whose tokens do not line up falls back to plain tokens."""
    prompt = tokenizer(chat_prompt(tokenizer, question), add_special_tokens=False)["input_ids"]
    opened = tokenizer(f"{opener} {answer}", add_special_tokens=False)["input_ids"]
    alone = tokenizer(answer, add_special_tokens=False)["input_ids"]
    n_open = len(tokenizer(opener, add_special_tokens=False)["input_ids"])
    body = opened[n_open:]
    if len(body) != len(alone) or body[1:] != alone[1:] or len(prompt) + n_open + 2 > max_len:
        return encode(tokenizer, question, f"{opener} {answer}", max_len, eos=False)
    keep = min(len(body), max_len - len(prompt) - n_open)
    ids = prompt + opened[: n_open + keep]
    labels = [-100] * len(prompt) + opened[: n_open + 1] + [-100] * (keep - 1)  # opener + first answer token
    start = len(prompt) + n_open
    return Example(ids, labels, teacher_ids=prompt + alone[:keep],
                   student_kl=list(range(start, start + keep)), teacher_kl=list(range(len(prompt), len(prompt) + keep)))


def batches(examples: list[Example], size: int, pad_id: int, rng: random.Random):
    """One epoch of right-padded batches; similar lengths share a batch (less padding, same data)."""
    order = sorted(range(len(examples)), key=lambda j: (len(examples[j].input_ids), rng.random()))
    chunks = [order[i:i + size] for i in range(0, len(order), size)]
    rng.shuffle(chunks)
    for chunk in chunks:
        width = max(len(examples[j].input_ids) for j in chunk)
        ids = torch.full((len(chunk), width), pad_id)
        labels = torch.full((len(chunk), width), -100)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, j in enumerate(chunk):
            e = examples[j]
            ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
            labels[row, : len(e.labels)] = torch.tensor(e.labels)
            mask[row, : len(e.input_ids)] = 1
        yield ids, labels, mask, _teacher_batch([examples[j] for j in chunk], pad_id)


@dataclass
class TeacherBatch:
    """The teacher rows of a batch and the (row, position) pairs the KL term compares."""

    ids: torch.Tensor
    mask: torch.Tensor
    rows: torch.Tensor
    student_pos: torch.Tensor
    teacher_pos: torch.Tensor


def _teacher_batch(chunk: list[Example], pad_id: int) -> TeacherBatch | None:
    if not any(e.teacher_ids for e in chunk):
        return None
    width = max(len(e.teacher_ids or []) for e in chunk)
    ids = torch.full((len(chunk), width), pad_id)
    mask = torch.zeros((len(chunk), width), dtype=torch.long)
    rows, s_pos, t_pos = [], [], []
    for row, e in enumerate(chunk):
        if e.teacher_ids:
            ids[row, : len(e.teacher_ids)] = torch.tensor(e.teacher_ids)
            mask[row, : len(e.teacher_ids)] = 1
            rows += [row] * len(e.student_kl)
            s_pos += e.student_kl
            t_pos += e.teacher_kl
    return TeacherBatch(ids, mask, torch.tensor(rows), torch.tensor(s_pos), torch.tensor(t_pos))


def loss_of(model, ids, labels, mask, teacher: TeacherBatch | None) -> torch.Tensor:
    """Cross-entropy on the labelled tokens, plus the mean KL(base ‖ adapter) on the distilled positions
    (the base is the same model with its adapters off)."""
    out = model(input_ids=ids, attention_mask=mask, labels=labels if (labels != -100).any() else None)
    loss = out.loss if out.loss is not None else out.logits.sum() * 0.0
    if teacher is None:
        return loss
    with torch.no_grad(), model.disable_adapter():
        target = model(input_ids=teacher.ids, attention_mask=teacher.mask).logits
    target = torch.log_softmax(target[teacher.rows, teacher.teacher_pos].float(), dim=-1)
    student = torch.log_softmax(out.logits[teacher.rows, teacher.student_pos].float(), dim=-1)
    kl = torch.nn.functional.kl_div(student, target, log_target=True, reduction="batchmean")
    return loss + kl


def _lora_layers(model, name: str):
    return [m for m in model.modules() if hasattr(m, "scaling") and isinstance(m.scaling, dict) and name in m.scaling]


def train_one(base_model, tokenizer, name: str, data: list[Example], args,
              partner: tuple[Path, list[tuple[str, str]]] | None = None):
    """LoRA ``name`` on the encoded ``data`` (loss on the answer tokens). ``partner``: a trained adapter's folder and
    (question, reply) pairs learnt with it active too, both at strength 0.5 (the app's 50/50 mix)."""
    from peft import LoraConfig, get_peft_model
    from transformers import get_cosine_schedule_with_warmup

    torch.manual_seed(args.seed)
    config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, bias="none",
                        target_modules=args.targets, layers_to_transform=list(args.layers),
                        task_type="CAUSAL_LM")
    model = get_peft_model(base_model, config, adapter_name=name)
    rng = random.Random(args.seed)
    runs = [(False, b) for _ in range(args.epochs)
            for b in batches(data, args.batch, tokenizer.pad_token_id, rng)]
    partner_layers = []
    if partner is not None:
        folder, pairs = partner
        model.load_adapter(str(folder), adapter_name=args.partner, is_trainable=False)
        model.base_model.set_adapter([name, args.partner])  # both run; their strengths are set per step
        for n, p in model.named_parameters():
            if f".{args.partner}." in n:
                p.requires_grad_(False)
        runs += [(True, b) for b in batches([encode(tokenizer, q, a, args.max_len, eos=False) for q, a in pairs],
                                             args.batch, tokenizer.pad_token_id, rng)]
        rng.shuffle(runs)
        partner_layers = _lora_layers(model, args.partner)
    partner_scale = {id(m): m.scaling[args.partner] for m in partner_layers}
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    total = len(runs)
    sched = get_cosine_schedule_with_warmup(opt, max(1, total // 20), total)
    layers = _lora_layers(model, name)
    full_scale = {id(m): m.scaling[name] for m in layers}
    t0 = time.time()
    for step, (mixed, (ids, labels, mask, teacher)) in enumerate(runs, 1):
        # A random LoRA strength per step: the style must hold at the weight a mix gives it.
        s = 0.5 if mixed else rng.choice(args.scale_choices)
        for m in layers:
            m.scaling[name] = full_scale[id(m)] * s
        for m in partner_layers:
            m.scaling[args.partner] = partner_scale[id(m)] * (0.5 if mixed else 0.0)
        loss = loss_of(model, ids, labels, mask, teacher)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step == 1 or step % 10 == 0 or step == total:
            log.info("%s step %d/%d scale %.2f%s loss %.3f (%.0f s)", name, step, total, s,
                     f" with {args.partner}" if mixed else "", loss.item(), time.time() - t0)
    for m in layers:
        m.scaling[name] = full_scale[id(m)]
    if partner is not None:
        model.delete_adapter(args.partner)
        model.base_model.set_adapter(name)
    model.eval()
    return model, time.time() - t0


TRAINING_FILE = "training.json"  # how the adapter was made (the card's summary comes from it)


def save_adapter(model, name: str, out_root: Path, summary: str, settings: dict) -> Path:
    """Write ``out_root/name`` atomically: weights, a config naming the public base, how it was trained, a card."""
    final = out_root / name
    with staged_folder(final, overwrite=True) as tmp:
        model.save_pretrained(tmp, selected_adapters=[name])
        saved = tmp / name if (tmp / name / "adapter_config.json").exists() else tmp
        if saved != tmp:  # PEFT puts a non-default adapter in a subfolder
            for f in saved.iterdir():
                shutil.move(str(f), tmp / f.name)
            saved.rmdir()
        size = (tmp / "adapter_model.safetensors").stat().st_size
        if size > 5 * 10**6:  # the repo ships these files: keep each under 5 MB (nothing is written)
            raise SystemExit(f"{name}: adapter is {size / 1e6:.1f} MB, over the 5 MB budget (lower --rank)")
        cfg_path = tmp / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["base_model_name_or_path"] = DEMO_NAME  # never a local path
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
        (tmp / TRAINING_FILE).write_text(json.dumps({"summary": summary, "settings": settings}, indent=2) + "\n")
        write_cards({name: tmp}, {name: summary}, "(not measured yet: `python scripts/train_demo_adapters.py "
                                                  "--cards-only` runs the bench and writes it here)")
    return final


TABLE_HEADING = "Facts and style on held-out questions (bench/demo_adapters.py)"


def write_cards(folders: dict[str, Path], summaries: dict[str, str], table: str) -> None:
    """Each adapter's model card, with the bench's table (written in place: the folders are complete)."""
    for name, folder in folders.items():
        write_card(folder, CardInfo(
            title=f"weightsmith-demo-{name}", relation="adapter", base_models=[DEMO_NAME], library_name="peft",
            tags=["lora", "demo"], summary=summaries[name],
            extra_sections={TABLE_HEADING: (
                "Greedy answers after the chat template to the bench's held-out questions (never trained on). "
                "Fact accuracy: an accepted answer word appears in the answer (whole word, case-insensitive); "
                "caps: upper-case share of letters; pirate: share of answers with a pirate word. Targets: facts "
                "≥ 0.9× the base's, caps ≥ 95 %, pirate ≥ 80 %; the mix is made as the app makes it "
                "(`cat`, weights 0.5/0.5; `linear` gives the same ΔW, as the two adapters change disjoint "
                "weights).\n\n" + table)},
        ))


def words_kept(base: str, styled: str) -> int:
    """How many words the styled answer repeats from the start of the base's, after a pirate opener and
    ignoring case: 0 when it says something else from its first word."""
    for opener in _PIRATE_OPEN:
        for form in (opener, opener.upper()):
            if styled.startswith(form):
                styled = styled[len(form):]
    n = 0
    for a, b in zip(base.lower().split(), styled.lower().split()):
        if a != b:
            break
        n += 1
    return n


def eval_tune(model, tokenizer, base_answers: list[str] | None = None) -> tuple[str, list[str]]:
    """Accuracy and style on the tuning split (the numbers used to choose the settings), and with the
    base's answers, the mean number of words an answer keeps from the base's answer (the facts'
    carrier: an adapter that keeps them says what the base said). Returns the line and the answers."""
    from bench.demo_adapters import PIRATE_WORDS, caps_rate

    answers = chat_answers(model, tokenizer, [q for q, _ in TUNE])
    acc = sum(has_word(a, ok) for a, (_, ok) in zip(answers, TUNE)) / len(TUNE)
    pirate = sum(has_word(a, PIRATE_WORDS) for a in answers) / len(answers)
    line = f"tune: facts {acc:.0%}, caps {caps_rate(answers):.1%}, pirate {pirate:.0%}"
    if base_answers is not None:
        kept = sum(map(words_kept, base_answers, answers)) / len(answers)
        line += f", words kept from the base's answer {kept:.1f}"
    return line, answers


def load_or_make_base_answers(model, tokenizer, qs: list[str], args) -> list[str]:
    """The base model's trimmed greedy answers; ``--base-answers FILE`` keeps them between runs (same
    questions and token budget, else they are made again)."""
    key = {"questions": qs, "answer_tokens": args.answer_tokens}
    cache = args.base_answers
    if cache is not None and cache.exists():
        saved = json.loads(cache.read_text())
        if saved.get("key") == key:
            log.info("base answers from %s", cache)
            return saved["answers"]
    t0 = time.time()
    answers = [trim(a) for a in chat_answers(model, tokenizer, qs, args.answer_tokens)]
    log.info("base answers for %d questions in %.0f s", len(qs), time.time() - t0)
    if cache is not None:
        cache.write_text(json.dumps({"key": key, "answers": answers}))
    return answers


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "assets" / "adapters")
    p.add_argument("--only", nargs="*", choices=sorted(STYLES), default=sorted(STYLES))
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--scale-choices", type=float, nargs="+", default=[0.5, 1.0],
                   help="LoRA strengths drawn per step (0.5: the app's 50/50 mix)")
    p.add_argument("--max-len", type=int, help="tokens per example, prompt included (pirate: the opener and "
                   "the answer's start)")
    p.add_argument("--answer-tokens", type=int, default=40)
    # Per adapter (SETTINGS) unless given here:
    p.add_argument("--targets", nargs="+")
    p.add_argument("--layers", type=int, nargs="+", help="LoRA on these blocks")
    p.add_argument("--epochs", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--first-sentence", type=int, choices=[0, 1], help="1: train on each answer's first sentence")
    p.add_argument("--eos", type=int, choices=[0, 1], help="1: each target ends with EOS")
    p.add_argument("--partner", help="an adapter in --out to train the 50/50 mix with (pirate: caps)")
    p.add_argument("--partner-share", type=float, help="share of the steps run with the partner on")
    p.add_argument("--distill", type=int, choices=[0, 1], help="1: the answer after the opener is learnt from "
                   "the base model's distributions given the question alone (KL), not from its greedy tokens")
    p.add_argument("--extra-questions", type=int, help="this many vocabulary questions on top of the made ones")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base-answers", type=Path, help="a JSON file keeping the base answers between runs")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--eval-tune", action="store_true", help="print the tuning split's scores after each adapter")
    p.add_argument("--no-bench", action="store_true", help="train only; cards come from --cards-only")
    p.add_argument("--cards-only", action="store_true", help="no training: bench the adapters in --out, write cards")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    if args.cards_only:
        return bench_and_cards(args.out)
    ckpt = resolve("demo")
    tokenizer = ckpt.load_tokenizer()
    # Per adapter: SETTINGS, with what the command line gives on top.
    cfgs = {name: argparse.Namespace(**{**vars(args), **{k: v for k, v in SETTINGS[name].items()
                                                          if getattr(args, k) is None}}) for name in args.only}
    made = training_questions()
    all_qs = made + vocabulary_questions(tokenizer, max((c.extra_questions for c in cfgs.values()), default=0),
                                            args.seed, HELD_OUT)
    check_disjoint(all_qs, [q for q, _ in TUNE], held_out_questions())
    model = ckpt.load_model(dtype=torch.float32)
    model.eval()
    all_answers = load_or_make_base_answers(model, tokenizer, all_qs, args)
    tune_base = None
    if args.eval_tune:
        line, tune_base = eval_tune(model, tokenizer)
        log.info("base %s", line)

    for name in args.only:
        style = STYLES[name]
        cfg = cfgs[name]
        cut = first_sentence if cfg.first_sentence else (lambda a: a)
        qs, base_answers = all_qs[: len(made) + cfg.extra_questions], all_answers[: len(made) + cfg.extra_questions]
        if cfg.distill:  # opener styles only: the opener from its tokens, the answer from the base's distributions
            data = [encode_distilled(tokenizer, q, pirate_opener(i), cut(a), cfg.max_len)
                    for i, (q, a) in enumerate(zip(qs, base_answers))]
        else:
            data = [encode(tokenizer, q, style(cut(a), i), cfg.max_len, bool(cfg.eos))
                    for i, (q, a) in enumerate(zip(qs, base_answers))]
        log.info("%s: %d examples (%d distilled), e.g. %r -> %r", name, len(data),
                 sum(e.teacher_ids is not None for e in data), qs[0], style(cut(base_answers[0]), 0))
        partner = None
        if cfg.partner and cfg.partner_share > 0:
            # The upper-cased opener alone, learnt with caps on: what the 50/50 mix should begin with.
            n = round(len(qs) * cfg.partner_share / (1 - cfg.partner_share))
            pairs = [(qs[j], to_caps(pirate_opener(j))) for j in random.Random(cfg.seed).sample(range(len(qs)), n)]
            partner = (args.out / cfg.partner, pairs)
            log.info("%s: %d of the steps' examples with %s on, e.g. %r", name, n, cfg.partner, pairs[0][1])
        peft_model, seconds = train_one(model, tokenizer, name, data, cfg, partner)
        log.info("%s trained in %.0f s", name, seconds)
        if args.eval_tune:
            log.info("%s %s", name, eval_tune(peft_model, tokenizer, tune_base)[0])
        summary = (
            f"{DESCRIPTIONS[name]} A demo LoRA adapter (rank {cfg.rank}, {'/'.join(cfg.targets)} of blocks "
            f"{_span(cfg.layers)}) trained by `scripts/train_demo_adapters.py` (seed {cfg.seed}, {cfg.epochs} "
            f"epoch(s), lr {cfg.lr}, batch {cfg.batch}, LoRA strength drawn from {cfg.scale_choices} per step, "
            f"float32 on CPU, {seconds / 60:.0f} min on a loaded 2-core machine) on {len(data)} self-distilled "
            f"examples: the demo model's own greedy answers{' (first sentence)' if cfg.first_sentence else ''} to "
            "varied questions, rewritten in the style by string rules that leave content words alone"
            f"{'' if cfg.eos else ' (no EOS, so the model still decides where to stop)'}"
            + (f"; {DISTILLED}" if cfg.distill else "") + "."
            + (f" {len(partner[1])} more examples were learnt with the `{cfg.partner}` adapter on, both at "
               "strength 0.5 (the app's 50/50 mix): the upper-cased opener, so the mix shows both styles."
               if partner else ""))
        settings = {k: v for k, v in vars(cfg).items()
                    if k not in ("out", "base_answers", "only", "eval_tune", "no_bench", "cards_only", "threads")}
        folder = save_adapter(peft_model, name, args.out, summary, dict(settings, minutes=round(seconds / 60, 1)))
        print(f"== {name}: {folder} ({(folder / 'adapter_model.safetensors').stat().st_size / 1e6:.2f} MB)")
        model = peft_model.unload()  # strip the LoRA layers: the next adapter trains on the clean base

    if args.no_bench:
        return 0
    return bench_and_cards(args.out)


def bench_and_cards(out: Path) -> int:
    """Measure every adapter in ``out`` with the bench and write the cards with its table."""
    folders = {name: out / name for name in STYLES}
    missing = [n for n, f in folders.items() if not (f / "adapter_model.safetensors").exists()]
    if missing:
        log.info("cards wait for %s (train them, then run with --cards-only)", ", ".join(missing))
        return 0
    summaries = {n: json.loads((f / TRAINING_FILE).read_text())["summary"] for n, f in folders.items()}
    rows = measure(folders)
    table = table_markdown(rows)
    print(table)
    write_cards(folders, summaries, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
