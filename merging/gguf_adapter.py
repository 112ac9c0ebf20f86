"""Write a PEFT LoRA adapter as a GGUF LoRA for llama.cpp (``llama-cli -m base.gguf --lora adapter.gguf``).

The layout is the one llama.cpp's ``convert_lora_to_gguf.py`` writes:
``general.type = "adapter"``, ``adapter.type = "lora"``, ``adapter.lora.alpha``,
and for every adapted weight two tensors named after the base tensor,
``blk.N.attn_q.weight.lora_a`` (A, ``[r, in]``) and ``….lora_b`` (B, ``[out, r]``).
llama.cpp applies ``W + (alpha / r) · B·A`` with ``r`` read from each tensor.

The adapter is read by :func:`merging.adapters.load_adapter` (the one reader), so
mixed adapters and ROME's rank-1 adapters export alike. Per-module scalings
that one global alpha cannot express (``rank_pattern``/``alpha_pattern``, as
ROME's adapters use, or rsLoRA) are folded into B: B' = B · scaling · r / alpha,
so ``(alpha / r) · B'·A`` is exactly PEFT's ``scaling · B·A``. The llama q/k
rows are permuted as in the model export (only B carries output rows).

Example::

    result = export_adapter_gguf("out/eiffel-rome-lora", Path("eiffel.gguf"), base="demo")
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from checkpoints.errors import WeightsmithError
from checkpoints.gguf_check import GGUFCheck, permuted_heads
from checkpoints.gguf_export import (
    GGUFExportResult,
    GGUFTensor,
    Progress,
    gguf_arch_of,
    gguf_names,
    llama_rope_permute,
    tensor_type,
    write_gguf,
)
from checkpoints.jobs import Job
from checkpoints.peft_adapter import CONFIG_NAME, LoraAdapter, base_reference
from checkpoints.sources import resolve
from merging.adapter_files import check_compatible, load_adapter

ADAPTER_GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")  # what convert_lora_to_gguf.py offers


def is_adapter_folder(ref: str | Path) -> bool:
    """True when ``ref`` is a local folder holding a PEFT adapter config."""
    path = Path(str(ref)).expanduser()
    return path.is_dir() and (path / CONFIG_NAME).is_file()


def declared_base(adapter: LoraAdapter) -> str:
    """The base model the adapter names, as a reference the resolver accepts (``demo`` for the demo model)."""
    return base_reference(adapter.config)


def plan_adapter(adapter: LoraAdapter, base, qtype: str) -> tuple[list[GGUFTensor], float]:
    """(tensors to write, adapter.lora.alpha) for ``adapter`` on checkpoint ``base``."""
    from checkpoints.gguf_export import GGUF_TYPES

    base_type = GGUF_TYPES[qtype][0]
    name_of = gguf_names(base)
    names = base.reader().keys()
    alpha = float(adapter.config.get("lora_alpha") or adapter.rank)
    plans: list[GGUFTensor] = []
    for module, (a, b) in sorted(adapter.factors.items(), key=lambda kv: _block_order(base, kv[0])):
        src = base.spec.weight_name(module, names)
        if src is None:
            raise WeightsmithError(f"adapter {adapter.name}: the base {base.name} has no weight for {module}")
        target = name_of(src)
        rank = a.shape[0]
        # fold PEFT's per-module scaling into B, so that llama.cpp's alpha / r gives it back exactly
        b_scaled = b * (adapter.scaling(module) * rank / alpha)
        heads = permuted_heads(base, src)
        if heads is not None:
            b_scaled = llama_rope_permute(b_scaled, heads)
        for suffix, factor in ((".lora_a", a), (".lora_b", b_scaled)):
            name = target + suffix
            shape = tuple(factor.shape)
            plans.append(GGUFTensor(name, shape, tensor_type(name, shape, base_type),
                                    lambda f=factor: f.to(torch.float32).contiguous(), source=f"{module}{suffix}"))
    return plans, alpha


def _block_order(base, module: str) -> tuple[int, str]:
    block = base.spec.block_of(module)
    return (-1 if block is None else block, module)


def base_checkpoint(adapter: LoraAdapter, base: Any = None, policy: dict[str, Any] | None = None):
    """The checkpoint ``adapter`` applies to: ``base`` (a reference or a ``LocalCheckpoint``), else the one its
    config names, resolved under ``policy`` (the resolver's ``allow_local``/``trusted_roots``/``allow_hub``)."""
    if base is not None and not isinstance(base, (str, Path)):
        return base
    return resolve(base or declared_base(adapter), **(policy or {}))


def export_adapter_gguf(adapter_ref: Any, out_path: Path | str, *, base: Any = None, qtype: str = "f32",
                        overwrite: bool = False, job: Job | None = None, progress: Progress | None = None,
                        cancel: threading.Event | None = None,
                        policy: dict[str, Any] | None = None) -> GGUFExportResult:
    """Export the PEFT LoRA adapter ``adapter_ref`` (folder, files or Hub id) as a GGUF LoRA.

    ``base`` is the model the adapter applies to (a reference the resolver accepts, or a
    ``LocalCheckpoint``); by default the one the adapter's config names, resolved under
    ``policy`` (a server passes its own: an adapter's config must not make it read
    arbitrary folders). It supplies the architecture, the tensor names and the head
    counts, and every A/B shape is checked against it. ``job`` reports per tensor and
    stops the write when cancelled (``progress``/``cancel``: the older keywords, for this session).
    """
    started = time.perf_counter()
    q = str(qtype).lower()
    if q not in ADAPTER_GGUF_TYPES:
        raise WeightsmithError(f"GGUF type {qtype!r} is not offered for LoRA adapters: choose one of "
                               f"{', '.join(ADAPTER_GGUF_TYPES)}")
    adapter = load_adapter(adapter_ref)
    ckpt = base_checkpoint(adapter, base, policy)
    check_compatible([adapter], ckpt, check_names=False)
    arch = gguf_arch_of(ckpt.spec)
    plans, alpha = plan_adapter(adapter, ckpt, q)

    def metadata(writer) -> None:
        import gguf

        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_name(adapter.name)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_string("general.base_model.0.name", ckpt.hub_id or ckpt.name)
        writer.add_uint32("general.base_model.count", 1)

    path, size = write_gguf(Path(out_path), arch, metadata, plans, overwrite=overwrite, job=job,
                            progress=progress, cancel=cancel)
    result = GGUFExportResult(path, q, len(plans), size, time.perf_counter() - started,
                              dict(Counter(p.qtype for p in plans)), kind="adapter")
    return result


def check_adapter_gguf(path: Path, adapter: LoraAdapter, base) -> GGUFCheck:
    """Read a GGUF LoRA back: for every module, ``(alpha / r) · lora_b @ lora_a`` decoded from the file must be
    PEFT's ΔW (in llama.cpp's row order) within the error the factors' types allow.

    Decoding, row order and bounds are :mod:`checkpoints.gguf_check`'s, not the writer's. With per-element
    factor bounds eA, eB: |Δ(B·A)| ≤ eB·|A| + |B|·eA + eB·eA (bounds taken from the decoded factors, with 1%
    room for that), plus float32 rounding of the folded scale.
    """
    import gguf
    import numpy as np

    from checkpoints.gguf_check import decode, error_bound, llama_rows, name_table

    reader = gguf.GGUFReader(str(path))
    alpha = float(reader.fields["adapter.lora.alpha"].contents())
    found = {t.name: t for t in reader.tensors}
    table = name_table(base)
    names = base.reader().keys()
    report = GGUFCheck()
    expected: set[str] = set()

    def read(t) -> np.ndarray:
        return decode(t.data, t.tensor_type.name, tuple(int(s) for s in reversed(t.shape))).astype(np.float64)

    for module in adapter.factors:
        src = base.spec.weight_name(module, names)
        target = table.get_name(src, try_suffixes=(".weight", ".bias")) if src else None
        ta, tb = (found.get(f"{target}.lora_{x}") for x in "ab") if target else (None, None)
        expected |= {f"{target}.lora_a", f"{target}.lora_b"}
        if ta is None or tb is None:
            report.failures.append(f"{module}: no lora_a/lora_b pair in the file")
            continue
        a, b = read(ta), read(tb)
        dw = adapter.delta(module).double().numpy()
        heads = permuted_heads(base, src)
        if heads is not None:
            dw = dw[llama_rows(dw.shape[0], heads)]
        scale = alpha / a.shape[0]
        got = scale * (b @ a)
        ea = error_bound(a.astype(np.float32), ta.tensor_type.name) * 1.01
        eb = error_bound(b.astype(np.float32), tb.tensor_type.name) * 1.01
        bound = scale * (eb @ np.abs(a) + np.abs(b) @ ea + eb @ ea) + 2.0 ** -20 * scale * (np.abs(b) @ np.abs(a))
        err = np.abs(got - dw)
        report.tensors += 2
        if (err > bound + 1e-12).any():
            i = int(np.argmax(err - bound))
            report.failures.append(f"{target} (lora): error {err.flat[i]:.3g} exceeds bound {bound.flat[i]:.3g}")
            continue
        ratio = float((err / np.maximum(bound, 1e-30)).max())
        if ratio > report.worst_ratio:
            report.worst_ratio, report.worst_tensor = ratio, f"{target} lora"
    for name in sorted(set(found) - expected):
        report.failures.append(f"{name}: in the file but not in the adapter")
    return report
