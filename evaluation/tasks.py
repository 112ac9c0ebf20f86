"""Evaluation task files: read, validate, identify.

Three kinds, told apart by the file itself:

* **perplexity**: a plain UTF-8 text file (any name but ``.jsonl``);
* **choice**: JSONL, one question a line ``{"query": str, "choices": [str, ...], "gold": int}``,
  scored by log-likelihood as lm-eval scores multiple choice (``query`` is the context, each
  choice is continued after one space);
* **generate**: JSONL ``{"prompt": str, "answers": [str, ...]}`` (or ``"answer": str``), scored
  by exact match and by containment of a greedy answer;
* **style**: JSONL ``{"prompt": str}`` only, scored by the demo adapters' style scores
  (:mod:`evaluation.style`) of the greedy answers.

Every line of a JSONL file is of one kind. A bad file is refused with one
:class:`WeightsmithError` line naming the file, the line and the problem: not
UTF-8, too large, a line too long, nesting too deep, a wrong field. Nothing of
a bad file is evaluated.

A bundled task is named by its file name without extension (``assets/tasks/``,
see :func:`bundled_tasks`); anything else is a path.

Example::

    task = load_task("capitals-mc")
    task.kind, len(task.items), task.digest[:12]
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from checkpoints.errors import WeightsmithError
from checkpoints.textfiles import read_text

TASKS_DIR = Path(__file__).resolve().parents[1] / "assets" / "tasks"
MAX_TASK_BYTES = 16 * 2**20
MAX_LINE_CHARS = 20_000  # a question with its choices; far above any real one
MAX_ITEMS = 20_000
MAX_CHOICES = 26
MAX_DEPTH = 4  # {"choices": [...]} is depth 2; deeper JSON is not a task line
TaskKind = Literal["perplexity", "choice", "generate", "style"]


@dataclass(frozen=True)
class ChoiceItem:
    query: str
    choices: tuple[str, ...]
    gold: int


@dataclass(frozen=True)
class PromptItem:
    """A generation prompt; ``answers`` empty for a style task."""

    prompt: str
    answers: tuple[str, ...] = ()


@dataclass(frozen=True)
class Task:
    """One task file, read and checked. ``digest``: SHA-256 of its bytes (part of every cache key)."""

    name: str
    kind: TaskKind
    digest: str
    text: str = ""  # perplexity tasks
    items: tuple[ChoiceItem | PromptItem, ...] = ()
    source: Path | None = None  # the file it was read from (the lm-eval backend hands it over)

    def head(self, limit: int | None) -> tuple[ChoiceItem | PromptItem, ...]:
        """The first ``limit`` items (all when None)."""
        return self.items if limit is None else self.items[:limit]


def bundled_tasks() -> dict[str, Path]:
    """The task files shipped in ``assets/tasks``, by name (file name without extension)."""
    if not TASKS_DIR.is_dir():
        return {}
    return {p.stem: p for p in sorted(TASKS_DIR.iterdir())
            if p.is_file() and p.suffix in (".jsonl", ".txt")}


def task_path(spec: str | Path) -> Path:
    """A bundled task's file, or ``spec`` as a path."""
    s = str(spec).strip()
    if not s:
        raise WeightsmithError("no task named")
    found = bundled_tasks().get(s)
    if found is not None:
        return found
    p = Path(s).expanduser()
    if not p.is_file():
        raise WeightsmithError(f"task {p.name or s}: no such file, and not a bundled task "
                               f"(bundled: {', '.join(bundled_tasks()) or 'none'})")
    return p


def load_task(spec: str | Path) -> Task:
    """Read and validate a task (a bundled name or a file)."""
    path = task_path(spec)
    text = read_text(path, what="task", max_bytes=MAX_TASK_BYTES)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    name = path.stem
    if path.suffix.lower() != ".jsonl":
        if not text.strip():
            raise WeightsmithError(f"task {path.name}: the text is empty")
        return Task(name, "perplexity", digest, text=text, source=path)
    return replace(parse_jsonl(text, name=name, file_name=path.name, digest=digest), source=path)


def parse_jsonl(text: str, *, name: str, file_name: str, digest: str) -> Task:
    """The items of a JSONL task; one error line naming ``file_name:line`` on the first problem."""
    items: list[ChoiceItem | PromptItem] = []
    kinds: set[str] = set()
    for no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"task {file_name}, line {no}"
        if len(line) > MAX_LINE_CHARS:
            raise WeightsmithError(f"{where}: {len(line):,} characters (at most {MAX_LINE_CHARS:,} a line)")
        if len(items) >= MAX_ITEMS:
            raise WeightsmithError(f"task {file_name}: more than {MAX_ITEMS:,} items")
        if _depth(line) > MAX_DEPTH:
            raise WeightsmithError(f"{where}: nested deeper than a task line ({MAX_DEPTH} levels)")
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise WeightsmithError(f"{where}: not JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise WeightsmithError(f"{where}: expected a JSON object, not {type(row).__name__}")
        item = _item(row, where)
        kind = "choice" if isinstance(item, ChoiceItem) else "generate" if item.answers else "style"
        kinds.add(kind)
        if len(kinds) > 1:
            raise WeightsmithError(f"{where}: a {kind} item in a file of {next(iter(kinds - {kind}))} items "
                                   "(one kind a file)")
        items.append(item)
    if not items:
        raise WeightsmithError(f"task {file_name}: no items")
    return Task(name, kinds.pop(), digest, items=tuple(items))  # type: ignore[arg-type]


def _depth(line: str) -> int:
    """Bracket nesting depth outside strings: checked before ``json.loads``, which recurses on it."""
    depth = deepest = 0
    in_str = escaped = False
    for ch in line:
        if in_str:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def _text_field(row: dict, key: str, where: str) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        raise WeightsmithError(f"{where}: {key!r} must be non-empty text")
    return value


def _known_fields(row: dict, fields: tuple[str, ...], what: str, where: str) -> None:
    unknown = set(row) - {*fields, "id"}
    if unknown:
        raise WeightsmithError(f"{where}: unknown field {sorted(unknown)[0]!r} ({what} has {', '.join(fields)})")


def _item(row: dict, where: str) -> ChoiceItem | PromptItem:
    if "choices" in row:
        _known_fields(row, ("query", "choices", "gold"), "a choice item", where)
        query = _text_field(row, "query", where)
        choices = row["choices"]
        if (not isinstance(choices, list) or not 2 <= len(choices) <= MAX_CHOICES
                or not all(isinstance(c, str) and c.strip() for c in choices)):
            raise WeightsmithError(f"{where}: 'choices' must be a list of 2 to {MAX_CHOICES} non-empty texts")
        gold = row.get("gold")
        if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
            raise WeightsmithError(f"{where}: 'gold' must be the index of the right choice (0 to {len(choices) - 1})")
        return ChoiceItem(query, tuple(choices), gold)
    if "prompt" in row:
        _known_fields(row, ("prompt", "answers", "answer"), "a prompt item", where)
        prompt = _text_field(row, "prompt", where)
        if "answers" in row and "answer" in row:
            raise WeightsmithError(f"{where}: give 'answers' or 'answer', not both")
        answers = row.get("answers", [row["answer"]] if "answer" in row else [])
        if not isinstance(answers, list) or not all(isinstance(a, str) and a.strip() for a in answers):
            raise WeightsmithError(f"{where}: 'answers' must be a list of non-empty texts")
        if ("answers" in row or "answer" in row) and not answers:
            raise WeightsmithError(f"{where}: 'answers' is empty")
        return PromptItem(prompt, tuple(answers))
    raise WeightsmithError(f"{where}: neither a choice item (query, choices, gold) nor a prompt item (prompt)")
