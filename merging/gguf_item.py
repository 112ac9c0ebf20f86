"""GGUF files inside an output folder (a merge, a mix, an edit, an adapter), with the card telling how to run them.

What the app's Export tab calls: the file is written into the folder itself
(``<folder>/<name>-<type>.gguf``), so that pushing the folder publishes it in
the same commit as the weights, and the card gains the ``gguf`` tag and a
section on running the file with llama.cpp and Ollama.

Example::

    out = export_folder_gguf(Path("out/my-merge"), "q8_0")
    out.result.summary(), out.check
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from typing import Any

from checkpoints.cards import add_card_section
from checkpoints.errors import WeightsmithError
from checkpoints.gguf_export import GGUFExportResult, Progress, estimate_size, export_gguf
from checkpoints.jobs import Job
from checkpoints.sources import resolve
from merging.adapters import load_adapter
from merging.gguf_adapter import (base_checkpoint, check_adapter_gguf, export_adapter_gguf, is_adapter_folder,
                                  plan_adapter)

SECTION = "Run it with llama.cpp or Ollama (GGUF)"


@dataclass
class FolderGGUF:
    """A GGUF file written into a folder: the export's result and the read-back check shown to the user."""

    result: GGUFExportResult
    check: str


def gguf_name(folder: Path, qtype: str) -> str:
    return f"{Path(folder).name}-{qtype}.gguf"


def estimate_folder_gguf(folder: Path, qtype: str, *, base: Any = None, policy: dict[str, Any] | None = None) -> int:
    """Bytes of the tensors of ``folder`` exported to ``qtype`` (a model, or an adapter on its base)."""
    folder = Path(folder)
    if is_adapter_folder(folder):
        adapter = load_adapter(folder)
        plans, _ = plan_adapter(adapter, base_checkpoint(adapter, base, policy), qtype)
        return sum(p.nbytes for p in plans)
    return estimate_size(resolve(folder, **(policy or {})), qtype)


def export_folder_gguf(folder: Path, qtype: str, *, base: Any = None, job: Job | None = None,
                       progress: Progress | None = None, cancel: threading.Event | None = None,
                       policy: dict[str, Any] | None = None) -> FolderGGUF:
    """Write ``folder`` as ``folder/<name>-<qtype>.gguf`` (replacing an older one), check it, and update the card.

    ``base`` and ``policy``: see :func:`merging.gguf_adapter.export_adapter_gguf` (for adapter folders).
    ``job``: progress and cancel of the write (``progress``/``cancel``: the older keywords, for this session).
    """
    from checkpoints.gguf_check import check_gguf

    folder = Path(folder)
    out = folder / gguf_name(folder, qtype)
    if is_adapter_folder(folder):
        adapter = load_adapter(folder)
        ckpt = base_checkpoint(adapter, base, policy)
        result = export_adapter_gguf(folder, out, base=ckpt, qtype=qtype, overwrite=True, job=job,
                                     progress=progress, cancel=cancel)
        report = check_adapter_gguf(out, adapter, ckpt)
    else:
        ckpt = resolve(folder, **(policy or {}))
        result = export_gguf(ckpt, out, qtype=qtype, overwrite=True, job=job, progress=progress, cancel=cancel)
        report = check_gguf(out, ckpt)
    if not report.ok:
        out.unlink(missing_ok=True)
        raise WeightsmithError(f"{out.name} removed: {report.summary()}")
    check = report.summary()
    if (folder / "README.md").is_file() and out.exists():
        add_card_section(folder, SECTION, run_section(folder, adapter=result.kind == "adapter"), tags=("gguf",))
    return FolderGGUF(result, check)


def run_section(folder: Path, *, adapter: bool) -> str:
    """Card text: the GGUF files in ``folder`` and how to run them with llama.cpp and Ollama."""
    files = sorted(p.name for p in Path(folder).glob("*.gguf"))
    name = Path(folder).name
    first = files[0] if files else gguf_name(folder, "q8_0")
    listing = "\n".join(f"- `{f}`" for f in files)
    if adapter:
        return (f"This LoRA adapter is also here in GGUF, as llama.cpp's `convert_lora_to_gguf.py` writes it:\n\n"
                f"{listing}\n\nApply it to a GGUF of its base model with llama.cpp:\n\n"
                f"```sh\nllama-cli -m base-model.gguf --lora {first} -p \"Hello\" -n 64\n```\n\n"
                f"Or with Ollama, from a `Modelfile` next to the files:\n\n"
                f"```\nFROM ./base-model.gguf\nADAPTER ./{first}\n```\n\n"
                f"```sh\nollama create {name} -f Modelfile\nollama run {name}\n```")
    return (f"This model is also here as GGUF, for llama.cpp, Ollama and LM Studio:\n\n{listing}\n\n"
            f"With llama.cpp:\n\n```sh\nllama-cli -m {first} -p \"The capital of France is\" -n 64\n"
            f"llama-server -m {first} --port 8080\n```\n\n"
            f"With Ollama, from a `Modelfile` next to the file (the chat template is read from the file):\n\n"
            f"```\nFROM ./{first}\nPARAMETER temperature 0.7\n```\n\n"
            f"```sh\nollama create {name} -f Modelfile\nollama run {name}\n```")
