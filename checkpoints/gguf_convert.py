"""Turn a ``.gguf`` file into a plain Hugging Face folder (float32 safetensors).

transformers dequantises GGUF on load (``from_pretrained(..., gguf_file=...)``)
but refuses to ``save_pretrained`` the result, so we rebuild a clean model from
its config without ``quantization_config`` and load the dequantised weights
into it. The result is cached, keyed by the file's name, size and mtime, so a
second call returns at once.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from .containment import error_line
from .errors import WeightsmithError
from .staging import staged_folder
from .home import weightsmith_home
from .build_lock import building_models

log = logging.getLogger(__name__)


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
    return target


def _dequantised(gguf: Path):
    """(clean float32 model, the loaded one, tokenizer) of ``gguf``; call under ``building_models``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
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
