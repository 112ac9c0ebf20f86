"""Write a checkpoint as one GGUF file for llama.cpp, Ollama and LM Studio.

The file holds what llama.cpp's own ``convert_hf_to_gguf.py`` writes: the
architecture keys, llama.cpp's tensor names (through the ``gguf`` package's
:func:`gguf.get_tensor_name_map`, the converter's own table), the tokenizer
(:mod:`checkpoints.gguf_vocab`), and the weights in the chosen type, quantised
with :mod:`gguf.quants`. Which architecture llama.cpp runs a ``model_type`` as,
and which projections it wants permuted, is declared in :mod:`checkpoints.arch`.

Tensor types follow the converter (1-D tensors, norms, biases and GPT-2's position
embedding stay float32; a row length that is not a multiple of the block size
falls back to F16) and, for the 4/5-bit types, ``llama-quantize``: the output
matrix (the token embedding when they are tied) is kept at 8 bits. llama-quantize
uses Q6_K there, falling back to Q8_0 when rows are not a multiple of 256 (as in
the SmolLM2 GGUF we ship); :mod:`gguf.quants` has no Q6_K quantiser, so Q8_0.

Memory: ``GGUFWriter.add_tensor`` keeps every tensor in memory until
``write_tensors_to_file``. We declare all tensor infos first (shapes and types
are known from the headers), write header, metadata and tensor infos, then read,
convert and write one tensor at a time with ``write_tensor_data``: peak memory
follows the largest tensor. The file is written beside its destination in a
staging folder (:func:`checkpoints.staging.new_staging_dir`) and renamed into
place only when complete and its size and tensor count check out.

Example::

    result = export_gguf("demo", Path("smollm2-q8_0.gguf"), qtype="q8_0")
    result.summary()   # "wrote smollm2-q8_0.gguf: 145.0 MB, q8_0, 272 tensors (...)"
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .arch import ArchSpec, supported_architectures
from .errors import WeightsmithError
from .gguf_check import name_table, permuted_heads
from .jobs import Job, StepCallback, legacy_job
from .staging import new_staging_dir, output_error

log = logging.getLogger(__name__)

Progress = StepCallback  # the older progress(done, total, tensor_name); pass a checkpoints.jobs.Job instead

# --type value -> (GGML tensor type, general.file_type)
GGUF_TYPES: dict[str, tuple[str, str]] = {
    "f32": ("F32", "ALL_F32"),
    "f16": ("F16", "MOSTLY_F16"),
    "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
    "q4_0": ("Q4_0", "MOSTLY_Q4_0"),
    "q4_1": ("Q4_1", "MOSTLY_Q4_1"),
    "q5_0": ("Q5_0", "MOSTLY_Q5_0"),
    "q5_1": ("Q5_1", "MOSTLY_Q5_1"),
}
_LOW_BIT = {"q4_0", "q4_1", "q5_0", "q5_1"}  # types whose output matrix llama-quantize keeps at 8 bits
# Buffers some checkpoints store that are not weights (the converter drops them too).
_SKIP_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")
# Tensors the converter always writes as float32 (besides 1-D tensors and norms).
_ALWAYS_F32 = ("position_embd.weight",)


def ggml_type(name: str):
    import gguf

    return gguf.GGMLQuantizationType[name]


def check_type(qtype: str) -> str:
    q = str(qtype).lower().strip()
    if q not in GGUF_TYPES:
        raise WeightsmithError(f"unknown GGUF type {qtype!r}: choose one of {', '.join(GGUF_TYPES)}")
    return q


def gguf_arch_of(spec: ArchSpec) -> str:
    """llama.cpp's architecture name for ``spec``; one clear error when there is none."""
    if spec.gguf_arch is None:
        exportable = [m for m in supported_architectures() if _spec(m).gguf_arch]
        raise WeightsmithError(
            f"GGUF export does not support architecture {spec.model_type!r}: supported are {', '.join(exportable)}"
        )
    return spec.gguf_arch


def _spec(model_type: str) -> ArchSpec:
    from .arch import ARCHITECTURES

    return ARCHITECTURES[model_type]


# ---------------------------------------------------------------------------
# Encoding one tensor
# ---------------------------------------------------------------------------


def storage(shape: tuple[int, ...], qtype) -> tuple[tuple[int, ...], Any, int]:
    """(shape handed to the writer, its numpy dtype, bytes) of a tensor of element ``shape`` in ``qtype``."""
    import gguf

    if qtype == gguf.GGMLQuantizationType.F32:
        return shape, np.float32, int(np.prod(shape)) * 4
    if qtype == gguf.GGMLQuantizationType.F16:
        return shape, np.float16, int(np.prod(shape)) * 2
    byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
    return byte_shape, np.uint8, int(np.prod(byte_shape))


def encode(data: np.ndarray, qtype) -> np.ndarray:
    """``data`` (float32) in ``qtype``'s bytes, by :func:`gguf.quants.quantize`."""
    import gguf

    return gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), qtype)


def fits_blocks(shape: tuple[int, ...], qtype) -> bool:
    import gguf

    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    return shape[-1] % block == 0


def llama_rope_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of a q/k projection from HF's rotary layout (halves) to llama.cpp's (interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# ---------------------------------------------------------------------------
# Streaming writer (shared by model and adapter export)
# ---------------------------------------------------------------------------


@dataclass
class GGUFTensor:
    """One tensor to write: GGUF ``name``, element ``shape`` (numpy order), GGML type name, and a producer."""

    name: str
    shape: tuple[int, ...]
    qtype: str
    produce: Callable[[], torch.Tensor] = field(repr=False)
    source: str = ""

    @property
    def nbytes(self) -> int:
        return storage(self.shape, ggml_type(self.qtype))[2]


@dataclass
class GGUFExportResult:
    """What was written: where, in which type, how many tensors of which GGML types, how big, how long."""

    path: Path
    qtype: str
    tensors: int
    bytes: int
    seconds: float
    types: dict[str, int]
    kind: str = "model"

    def summary(self) -> str:
        mix = ", ".join(f"{n} {t}" for t, n in sorted(self.types.items(), key=lambda kv: -kv[1]))
        what = "adapter " if self.kind == "adapter" else ""
        return (f"wrote {what}{self.path.name}: {self.bytes / 1e6:.1f} MB, {self.qtype}, "
                f"{self.tensors} tensors ({mix}), {self.seconds:.1f} s")


def write_gguf(out_path: Path, arch: str, add_metadata: Callable[[Any], None], tensors: list[GGUFTensor], *,
               overwrite: bool = False, job: Job | None = None, progress: Progress | None = None,
               cancel: threading.Event | None = None) -> tuple[Path, int]:
    """Write a GGUF file tensor by tensor into a staging folder beside ``out_path``, check it, rename it into place.

    ``job`` gets one step per tensor and is checked for a cancel before each
    (``progress``/``cancel``: the older form of the same, not both).
    Returns (path, bytes). Nothing is left at ``out_path`` on an error or a cancel.
    """
    import gguf

    job = legacy_job(job, progress, cancel, len(tensors))
    out_path = Path(out_path)
    if out_path.is_dir():
        raise WeightsmithError(f"{out_path} is a folder; name the .gguf file to write")
    staging = new_staging_dir(out_path, overwrite=overwrite)
    tmp = staging / out_path.name
    writer = None
    try:
        writer = gguf.GGUFWriter(path=None, arch=arch)
        add_metadata(writer)
        for t in tensors:
            shape, dtype, nbytes = storage(t.shape, ggml_type(t.qtype))
            writer.add_tensor_info(t.name, shape, np.dtype(dtype), nbytes, raw_dtype=ggml_type(t.qtype))
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        align = writer.data_alignment
        expected = _pad(writer.fout[0].tell(), align) + sum(_pad(t.nbytes, align) for t in tensors)
        for i, t in enumerate(tensors):
            job.check("the GGUF export")
            data = t.produce()
            # one pass, no tensor-sized temporaries: NaN propagates into min/max, an infinity is an extreme
            lo, hi = (float(v) for v in torch.aminmax(data)) if data.numel() else (0.0, 0.0)
            if not (math.isfinite(lo) and math.isfinite(hi)):
                raise WeightsmithError(f"tensor {t.source or t.name} has NaN or infinite values; nothing was written")
            if t.qtype == "F16" and max(-lo, hi) > 65504.0:
                raise WeightsmithError(f"tensor {t.source or t.name} exceeds the float16 range; choose f32 or bf16")
            arr = encode(data.detach().to("cpu", torch.float32).numpy(), ggml_type(t.qtype))
            writer.write_tensor_data(arr)
            del data, arr
            job.step(i + 1, len(tensors), t.name)
        writer.close()
        size = _check_written(tmp, len(tensors), expected)
        os.replace(tmp, out_path)
    except OSError as e:
        raise (output_error(e, out_path) or WeightsmithError(f"{out_path.name}: cannot write ({e.strerror or e})")) from None
    finally:
        if writer is not None:
            writer.close()  # after an error too: no file handle left on the removed partial file
        shutil.rmtree(staging, ignore_errors=True)
    return out_path, size


def _pad(n: int, align: int) -> int:
    return (n + align - 1) // align * align


def _check_written(path: Path, n_tensors: int, expected: int) -> int:
    """The cheap check of every file written: GGUF magic, version 3, the tensor count, and the size that
    header, metadata and every tensor's aligned bytes add up to. Returns the size.

    (Reading it back with :class:`gguf.GGUFReader` costs seconds per 50k-token vocabulary; the full
    value check is :func:`checkpoints.gguf_check.check_gguf`, run by the app and ``export-gguf --check``.)
    """
    import struct

    with open(path, "rb") as f:
        magic, version, count = struct.unpack("<4sIQ", f.read(16))
    size = path.stat().st_size
    if magic != b"GGUF" or version != 3 or count != n_tensors or size != expected:
        raise WeightsmithError(f"{path.name}: written file is inconsistent ({count} tensors, {size} bytes; "
                               f"expected {n_tensors} tensors, {expected} bytes); nothing was kept")
    return size


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------


def _hparam(config: dict[str, Any], *keys: str) -> Any:
    for k in keys:
        if config.get(k) is not None:
            return config[k]
    return None


def gguf_names(ckpt) -> Callable[[str], str]:
    """HF tensor name -> llama.cpp tensor name for ``ckpt``'s architecture (the converter's own table)."""
    arch = gguf_arch_of(ckpt.spec)
    table = name_table(ckpt)

    def name_of(src: str) -> str:
        name = table.get_name(src, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise WeightsmithError(f"{ckpt.name}: tensor {src} has no llama.cpp name for architecture {arch!r}")
        return name
    return name_of


def plan_model(ckpt, qtype: str) -> list[GGUFTensor]:
    """The GGUF tensors of checkpoint ``ckpt`` in type ``qtype``: names, shapes, types and how to produce each."""
    qtype = check_type(qtype)
    spec = ckpt.spec
    reader = ckpt.reader()
    name_of = gguf_names(ckpt)
    skip = set(ckpt.tied_names())
    base_type = GGUF_TYPES[qtype][0]
    plans: list[GGUFTensor] = []
    for src, meta in reader.metas().items():
        if src in skip or src.endswith(_SKIP_SUFFIXES):
            continue
        name = name_of(src)
        shape = tuple(meta.shape)
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None
        heads = permuted_heads(ckpt, src)
        if spec.transposed and spec.block_of(src) is not None and len(shape) == 2 and src.endswith(".weight"):
            transform, shape = spec.as_out_in, (shape[1], shape[0])  # GPT-2 Conv1D: llama.cpp wants [out, in]
        elif heads is not None:
            transform = lambda t, h=heads: llama_rope_permute(t, h)  # noqa: E731
        plans.append(GGUFTensor(name, shape, tensor_type(name, shape, base_type),
                                _producer(reader, src, transform), source=src))
    if qtype in _LOW_BIT:
        head = next((p for p in plans if p.name == "output.weight"), None) or next(
            (p for p in plans if p.name == "token_embd.weight"), None)
        if head is not None and head.qtype == base_type and fits_blocks(head.shape, ggml_type("Q8_0")):
            head.qtype = "Q8_0"
    return plans


def tensor_type(name: str, shape: tuple[int, ...], base_type: str) -> str:
    """The converter's rule: float32 for 1-D tensors, norms, biases and position embeddings; F16 when rows do
    not fill whole quantisation blocks; else the requested type (LoRA factors included)."""
    if (len(shape) <= 1 or name.endswith("_norm.weight") or name in _ALWAYS_F32
            or not name.endswith((".weight", ".lora_a", ".lora_b"))):
        return "F32"
    if base_type not in ("F32", "F16", "BF16") and not fits_blocks(shape, ggml_type(base_type)):
        return "F16"
    return base_type


def _producer(reader, src: str, transform) -> Callable[[], torch.Tensor]:
    def produce() -> torch.Tensor:
        t = reader.get(src, dtype=torch.float32)
        return transform(t).contiguous() if transform is not None else t
    return produce


def add_model_metadata(writer, ckpt, qtype: str, name: str) -> None:
    """Put the architecture keys, file type, name and tokenizer of ``ckpt`` into a ``gguf.GGUFWriter``."""
    import gguf

    config = ckpt.config
    spec = ckpt.spec
    arch = gguf_arch_of(spec)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(gguf.LlamaFileType[GGUF_TYPES[qtype][1]])
    writer.add_block_count(ckpt.num_layers)
    if arch == "gpt2":
        n_embd = config["n_embd"]
        writer.add_context_length(_hparam(config, "n_ctx", "n_positions"))
        writer.add_embedding_length(n_embd)
        writer.add_feed_forward_length(_hparam(config, "n_inner") or 4 * n_embd)
        writer.add_head_count(config["n_head"])
        writer.add_layer_norm_eps(_hparam(config, "layer_norm_epsilon") or 1e-5)
    else:
        writer.add_context_length(config["max_position_embeddings"])
        writer.add_embedding_length(config["hidden_size"])
        writer.add_feed_forward_length(config["intermediate_size"])
        writer.add_head_count(config["num_attention_heads"])
        writer.add_head_count_kv(_hparam(config, "num_key_value_heads", "num_attention_heads"))
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(rope["factor"])
        elif rope_type not in (None, "default"):
            raise WeightsmithError(f"{ckpt.name}: RoPE scaling {rope_type!r} is not supported by GGUF export here")
        theta = rope.get("rope_theta", config.get("rope_theta"))
        if theta is not None:
            writer.add_rope_freq_base(float(theta))
        writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
        if config.get("head_dim") is not None:
            writer.add_key_length(config["head_dim"])
            writer.add_value_length(config["head_dim"])
        if arch == "llama":
            writer.add_vocab_size(config["vocab_size"])
            writer.add_rope_dimension_count(config.get("head_dim")
                                            or config["hidden_size"] // config["num_attention_heads"])
    from .gguf_vocab import add_tokenizer

    add_tokenizer(writer, ckpt.support_dir, config, arch)


def estimate_size(ckpt, qtype: str) -> int:
    """Bytes of the weights in a GGUF export of ``ckpt`` in ``qtype`` (the tokenizer adds a few MB)."""
    return sum(t.nbytes for t in plan_model(ckpt, qtype))


def export_gguf(model: Any, out_path: Path | str, *, qtype: str = "q8_0", overwrite: bool = False,
                job: Job | None = None, progress: Progress | None = None, cancel: threading.Event | None = None,
                name: str | None = None) -> GGUFExportResult:
    """Export ``model`` (anything :func:`checkpoints.sources.resolve` accepts, or a ``LocalCheckpoint``) to GGUF.

    Args:
        out_path: the ``.gguf`` file to write; it must not exist unless ``overwrite``.
        qtype: one of :data:`GGUF_TYPES`.
        job: progress (one step per tensor), cancel and log (:mod:`checkpoints.jobs`); a
            cancelled job stops the export at the next tensor and nothing is written.
        progress, cancel: the older ``progress(done, total, tensor_name)`` callback and
            cancel event, for callers not yet passing ``job`` (not both).
        name: ``general.name`` in the file (default: the checkpoint's public name).

    Raises :class:`WeightsmithError` (one line) for an unsupported architecture,
    tokenizer or type, non-finite weights, or an unwritable destination.
    """
    from .sources import resolve

    started = time.perf_counter()
    qtype = check_type(qtype)
    ckpt = resolve(model) if isinstance(model, (str, Path)) else model
    ckpt.check_matches_config()
    arch = gguf_arch_of(ckpt.spec)
    plans = plan_model(ckpt, qtype)
    path, size = write_gguf(Path(out_path), arch, lambda w: add_model_metadata(w, ckpt, qtype, name or ckpt.name),
                            plans, overwrite=overwrite, job=job, progress=progress, cancel=cancel)
    result = GGUFExportResult(path, qtype, len(plans), size, time.perf_counter() - started,
                              dict(Counter(p.qtype for p in plans)))
    log.debug("%s", result.summary())
    return result

