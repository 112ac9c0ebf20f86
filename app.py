"""Weightsmith web app: the file a Hugging Face Space runs (``app_file: app.py``).

The UI lives in the ``ui`` package beside it (handlers, forms, plots, layout); this file builds
and launches it. ``python app.py`` serves on ``GRADIO_SERVER_NAME``/``GRADIO_SERVER_PORT`` (a Space
sets them); ``weightsmith serve`` and ``make run`` call :func:`ui.server.serve` with their flags.
Embedding: ``build_app(config=AppConfig(...)).queue(**queue_kwargs(config)).launch(**launch_kwargs(config))``.
"""

import logging
import os

from ui.config import AppConfig, launch_kwargs, queue_kwargs  # noqa: F401 - for embedding (bench/soak_app.py)
from ui.layout import build_app  # noqa: F401
from ui.server import serve

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    serve(host=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
          port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
