"""Check a GGUF export against its source checkpoint, without trusting the writer.

The file is read back with :class:`gguf.GGUFReader`; every tensor's bytes are
decoded here from the GGML block layouts (not with ``gguf.quants``, which the
writer used) and compared with the source tensor, brought into llama.cpp's
orientation by code of its own (an index map for the llama q/k row order, a
transpose for GPT-2's Conv1D weights). Each value must sit within the known
error of its type, per block of 32 along a row (``amax`` = largest magnitude in
the block, ``range`` = max − min, ``u`` = 2⁻¹¹ the float16 rounding, ``s`` = 2⁻²⁵ the
float16 subnormal half-step); the scales themselves are stored as float16:

=======  ============================================================  =====================================
type     value                                                          bound
=======  ============================================================  =====================================
F32      x                                                              0
F16      fp16(x)                                                        \\|x\\|·u + s
BF16     bf16(x), round to nearest even                                 \\|x\\|·2⁻⁸
Q8_0     q·d, d = amax/127, q = round(x/d) ∈ [−127, 127]               amax/254 + 127·(d·u + s)
Q4_0     (q−8)·d, \\|d\\| = amax/8, q = clip(⌊x/d + 8.5⌋, 0, 15)         amax/8 + 8·(\\|d\\|·u + s)  (clip at 15)
Q4_1     q·d + m, d = range/15, m = min, q = round((x−m)/d) ∈ [0, 15]  range/30 + 15·(d·u + s) + \\|m\\|·u + s
Q5_0     (q−16)·d, \\|d\\| = amax/16, q = clip(⌊x/d + 16.5⌋, 0, 31)      amax/16 + 16·(\\|d\\|·u + s) (clip at 31)
Q5_1     q·d + m, d = range/31, q ∈ [0, 31]                              range/62 + 31·(d·u + s) + \\|m\\|·u + s
=======  ============================================================  =====================================

(The 4/5-bit symmetric types take the scale from the signed extreme, so a value of the
opposite sign near ``amax`` lands one step short: their bound is a full step, not half.)
A relative slack of 2⁻²⁰·amax covers float32 arithmetic in the quantiser.

Example::

    report = check_gguf(Path("out.gguf"), resolve("demo"))
    report.ok, report.worst_ratio, report.failures[:3]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import WeightsmithError

U = 2.0 ** -11
S = 2.0 ** -25
SLACK = 2.0 ** -20
BLOCK = 32


def _f16(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)


def decode(raw: np.ndarray, type_name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Float32 values of a tensor of element ``shape`` stored as ``raw`` bytes in GGML type ``type_name``."""
    raw = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    if type_name == "F32":
        return raw.view(np.float32).reshape(shape)
    if type_name == "F16":
        return raw.view(np.float16).astype(np.float32).reshape(shape)
    if type_name == "BF16":
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape)
    sizes = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24}
    if type_name not in sizes:
        raise WeightsmithError(f"cannot decode GGML type {type_name}")
    b = raw.reshape(-1, sizes[type_name])
    d = _f16(b[:, 0:2])
    if type_name == "Q8_0":
        return (d * b[:, 2:].view(np.int8).astype(np.float32)).reshape(shape)
    has_min = type_name in ("Q4_1", "Q5_1")
    m = _f16(b[:, 2:4]) if has_min else 0.0
    at = 4 if has_min else 2
    qh = None
    if type_name.startswith("Q5"):
        qh = b[:, at:at + 4].copy().view("<u4").astype(np.uint32)  # bit j = 5th bit of element j
        at += 4
    qs = b[:, at:at + 16].astype(np.int32)
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1)  # low nibbles: elements 0-15, high: 16-31
    if qh is not None:
        bits = (qh >> np.arange(32, dtype=np.uint32)) & 1
        q = q | (bits.astype(np.int32) << 4)
    offset = 0 if has_min else (16 if type_name.startswith("Q5") else 8)
    return ((q - offset).astype(np.float32) * d + m).reshape(shape)


def error_bound(source: np.ndarray, type_name: str) -> np.ndarray:
    """Largest allowed |decoded − source| for each element of ``source`` (GGUF orientation) in ``type_name``."""
    x = source.astype(np.float32)
    if type_name == "F32":
        return np.zeros_like(x)
    if type_name == "F16":
        return np.abs(x) * U + S
    if type_name == "BF16":
        return np.abs(x) * 2.0 ** -8 + 1e-38
    blocks = x.reshape(-1, BLOCK)
    amax = np.abs(blocks).max(axis=1, keepdims=True)
    lo, hi = blocks.min(axis=1, keepdims=True), blocks.max(axis=1, keepdims=True)
    rng = hi - lo
    if type_name == "Q8_0":
        bound = amax / 254 + 127 * (amax / 127 * U + S)
    elif type_name == "Q4_0":
        bound = amax / 8 + 8 * (amax / 8 * U + S)
    elif type_name == "Q5_0":
        bound = amax / 16 + 16 * (amax / 16 * U + S)
    elif type_name == "Q4_1":
        bound = rng / 30 + 15 * (rng / 15 * U + S) + np.abs(lo) * U + S
    elif type_name == "Q5_1":
        bound = rng / 62 + 31 * (rng / 31 * U + S) + np.abs(lo) * U + S
    else:
        raise WeightsmithError(f"no error bound for GGML type {type_name}")
    bound = bound + SLACK * np.maximum(amax, np.abs(lo))
    return np.broadcast_to(bound, blocks.shape).reshape(x.shape)


def llama_rows(n_rows: int, n_head: int) -> np.ndarray:
    """Source row of each llama.cpp row of a q/k projection.

    transformers keeps each head's rotary pairs as (i, i + d/2); llama.cpp keeps them
    adjacent (2i, 2i + 1). Row ``h·d + 2i + j`` of the GGUF tensor is row ``h·d + j·d/2 + i``.
    """
    d = n_rows // n_head
    rows = np.empty(n_rows, dtype=np.int64)
    for h in range(n_head):
        for i in range(d // 2):
            for j in range(2):
                rows[h * d + 2 * i + j] = h * d + j * (d // 2) + i
    return rows


@dataclass
class GGUFCheck:
    """Outcome of :func:`check_gguf`: tensors compared, the worst error/bound ratio, and what failed."""

    tensors: int = 0
    worst_ratio: float = 0.0
    worst_tensor: str = ""
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def summary(self) -> str:
        if not self.ok:
            return f"GGUF check FAILED: {'; '.join(self.failures[:3])}"
        worst = f" (worst {self.worst_ratio:.2f} of the bound, {self.worst_tensor})" if self.worst_tensor else " (exact)"
        return f"read back {self.tensors} tensors: every value within its type's error bound{worst}"


def name_table(ckpt):
    """The ``gguf`` package's HF -> llama.cpp tensor name table for ``ckpt``'s declared architecture."""
    import gguf

    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == ckpt.spec.gguf_arch)
    return gguf.get_tensor_name_map(arch_enum, ckpt.num_layers)


def permuted_heads(ckpt, src: str) -> int | None:
    """Heads whose rotary rows llama.cpp interleaves in tensor ``src`` (declared in the arch map), else None."""
    spec = ckpt.spec
    block = spec.block_of(src)
    if not spec.gguf_rope_permute or block is None:
        return None
    q_mod, k_mod = (f"{spec.block(block)}.{m}." for m in spec.gguf_rope_permute)
    n_head = ckpt.config.get("num_attention_heads")
    return n_head if src.startswith(q_mod) else (ckpt.config.get("num_key_value_heads") or n_head
                                                 if src.startswith(k_mod) else None)


def expected_tensors(ckpt) -> dict[str, tuple[str, str | None]]:
    """GGUF name -> (source tensor, orientation change) for ``ckpt``; from the declared architecture."""
    spec = ckpt.spec
    table = name_table(ckpt)
    tied = set(ckpt.tied_names())
    out: dict[str, tuple[str, str | None]] = {}
    for src, meta in ckpt.reader().metas().items():
        name = table.get_name(src, try_suffixes=(".weight", ".bias"))
        if src in tied or name is None:
            continue  # a tied head is the embedding; buffers (masks, inv_freq) have no llama.cpp name
        change = None
        if spec.transposed and spec.block_of(src) is not None and len(meta.shape) == 2 and src.endswith(".weight"):
            change = "transpose"
        elif permuted_heads(ckpt, src) is not None:
            change = "permute"
        out[name] = (src, change)
    return out


def oriented(ckpt, src: str, change: str | None) -> np.ndarray:
    """Source tensor ``src`` of ``ckpt`` as float32, in llama.cpp's orientation (see :func:`expected_tensors`)."""
    import torch

    x = ckpt.reader().get(src, dtype=torch.float32).numpy()
    if change == "transpose":
        return x.T
    if change == "permute":
        return x[llama_rows(x.shape[0], permuted_heads(ckpt, src))]
    return x


def check_gguf(path: Path, ckpt) -> GGUFCheck:
    """Compare every tensor of the GGUF file ``path`` with ``ckpt`` (a ``LocalCheckpoint``)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    found = {t.name: t for t in reader.tensors}
    expected = expected_tensors(ckpt)
    report = GGUFCheck()
    for name in sorted(set(found) - set(expected)):
        report.failures.append(f"{name}: in the file but not in the source")
    for name, (src, change) in expected.items():
        t = found.get(name)
        if t is None:
            report.failures.append(f"{name}: missing (source {src})")
            continue
        x = oriented(ckpt, src, change)
        shape = tuple(int(s) for s in reversed(t.shape))
        if shape != x.shape:
            report.failures.append(f"{name}: shape {list(shape)}, source {src} has {list(x.shape)}")
            continue
        type_name = t.tensor_type.name
        got = decode(t.data, type_name, shape)
        err = np.abs(got - x)
        bound = error_bound(x, type_name)
        over = err > bound
        report.tensors += 1
        if over.any():
            i = int(np.argmax(err - bound))
            report.failures.append(f"{name} ({type_name}): error {err.flat[i]:.3g} exceeds bound {bound.flat[i]:.3g}")
            continue
        ratio = float((err / np.maximum(bound, 1e-30)).max()) if bound.any() else 0.0
        if ratio > report.worst_ratio:
            report.worst_ratio, report.worst_tensor = ratio, f"{name} {type_name}"
    return report
