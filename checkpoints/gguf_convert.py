"""Turn a ``.gguf`` file into a plain Hugging Face folder (float32 safetensors).

transformers dequantises GGUF on load (``from_pretrained(..., gguf_file=...)``)
but refuses to ``save_pretrained`` the result, so we rebuild a clean model from
its config without ``quantization_config`` and load the dequantised weights
into it. The result is cached, keyed by the file's name, size and mtime, so a
second call returns at once.

The tokenizer is transformers' reading of the file, with one repair: transformers
rebuilds the pre-tokenizer (how text is split before BPE) only for the
``tokenizer.ggml.pre`` names it maps to a Split regex, and leaves others, such as
SmolLM's ``smollm`` (each digit on its own, then GPT-2's regex), as plain GPT-2.
We set the pre-tokenizer the name stands for (:func:`checkpoints.gguf_vocab.pre_tokenizer_of`),
so the folder splits text as llama.cpp splits it for that file, and a GGUF export
of it names the same pre-tokenizer. A folder converted before this repair (no
:data:`MARKER` of version :data:`CONVERSION`) gets its tokenizer files redone on
the next call; its weights are not touched.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

from .containment import error_line
from .errors import WeightsmithError
from .staging import OWNER_FILE, new_staging_dir, output_error, staged_folder
from .home import weightsmith_home
from .build_lock import building_models

log = logging.getLogger(__name__)

# Version of what a converted folder holds; bumped when that changes (2: the file's pre-tokenizer kept).
CONVERSION = 2
MARKER = ".weightsmith-conversion"


def _cache_key(gguf: Path) -> str:
    st = gguf.stat()
    digest = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:12]
    return f"{gguf.stem}-{digest}"


def convert_gguf(gguf: Path, *, cache_root: Path | None = None, out_dir: Path | None = None) -> Path:
    """Convert ``gguf`` once; return the HF folder (config, tokenizer, float32 safetensors)."""
    gguf = Path(gguf)
    if not gguf.is_file():
        raise WeightsmithError(f"{gguf.name}: no such GGUF file")
    target = out_dir or (cache_root or weightsmith_home() / "models") / _cache_key(gguf)
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        if _conversion_of(target) < CONVERSION:
            _redo_tokenizer(gguf, target)
        return target
    log.info("converting %s to a float32 Hugging Face folder (once)", gguf.name)
    # transformers patches process-wide state while it builds a model: one build at a time.
    with building_models():
        clean, loaded, tok = _dequantised(gguf)
    clean.generation_config = loaded.generation_config
    # overwrite: a half-converted leftover (no weights) is replaced, never trusted
    with staged_folder(target, overwrite=True) as tmp:
        clean.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / MARKER).write_text(str(CONVERSION))
    return target


def _conversion_of(folder: Path) -> int:
    try:
        return int((folder / MARKER).read_text().strip())
    except (OSError, ValueError):
        return 1  # converted before the marker existed


def _redo_tokenizer(gguf: Path, target: Path) -> None:
    """Rewrite the tokenizer files of a folder an older version converted; file by file, each atomically."""
    log.info("updating the tokenizer of %s (converted by an older version)", target.name)
    tok = gguf_tokenizer(gguf)
    staging = new_staging_dir(target / "tokenizer", overwrite=True)  # inside target: same file system
    try:
        tok.save_pretrained(staging)
        for f in staging.iterdir():
            if f.name != OWNER_FILE:
                os.replace(f, target / f.name)
        (target / MARKER).write_text(str(CONVERSION))
    except OSError as e:
        raise (output_error(e, target) or WeightsmithError(f"{target}: cannot update the tokenizer ({e})")) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def gguf_tokenizer(gguf: Path):
    """transformers' tokenizer of the GGUF file ``gguf``, splitting text as llama.cpp does for that file."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    meta = _metadata(gguf)
    if meta.get("tokenizer.ggml.model") == "gpt2":
        _keep_pre_tokenizer(tok, str(meta.get("tokenizer.ggml.pre", "default")), gguf.name)
    return tok


def _keep_pre_tokenizer(tok, name: str, file: str) -> None:
    from .gguf_vocab import pre_tokenizer_name, pre_tokenizer_of

    try:
        if pre_tokenizer_name(json.loads(tok.backend_tokenizer.to_str())) == name:
            return  # transformers already splits as the file says
    except WeightsmithError:
        pass  # a pre-tokenizer llama.cpp has no name for: replace it if we know the file's
    wanted = pre_tokenizer_of(name)
    if wanted is None:
        log.warning("%s: tokenizer.ggml.pre = %r has no tokenizers equivalent known here; text is split as "
                    "transformers reads it, which may differ from llama.cpp", file, name)
        return
    tok.backend_tokenizer.pre_tokenizer = wanted


def _metadata(gguf: Path) -> dict:
    """The file's metadata keys, read without decoding its token and merge lists."""
    try:
        # transformers' own reader: a second; gguf.GGUFReader decodes all 100k strings (minutes on a busy machine)
        from transformers.integrations.gguf.reader import read_gguf_metadata
    except ImportError:  # transformers before its own GGUF reader
        import gguf as gguf_py

        reader = gguf_py.GGUFReader(str(gguf))
        return {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.ggml.")
                and k.endswith((".model", ".pre"))}
    return read_gguf_metadata(str(gguf), ())[0]


def _dequantised(gguf: Path):
    """(clean float32 model, the loaded one, tokenizer) of ``gguf``; call under ``building_models``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        tok = gguf_tokenizer(gguf)
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:
        raise WeightsmithError(f"{gguf.name}: cannot read GGUF: {error_line(e, gguf.parent)}") from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config = AutoConfig.for_model(**{k: v for k, v in config.to_dict().items() if k != "quantization_config"})
    config.dtype = "float32"
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = clean.load_state_dict(loaded.state_dict(), strict=False)
    missing = [m for m in missing if not (getattr(config, "tie_word_embeddings", False) and "lm_head" in m)]
    if missing or unexpected:
        raise WeightsmithError(f"{gguf.name}: converted weights do not match the config (missing {missing[:3]})")
    clean.tie_weights()
    return clean, loaded, tok
