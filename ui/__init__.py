"""Weightsmith's web UI (Gradio): widgets over the library, one job per module.

``app.py`` (what Spaces run) builds and launches it. Modules:

* :mod:`ui.config`: server policy and limits (``AppConfig``);
* :mod:`ui.endpoint`: what every endpoint does around its handler (typed arguments, one-line errors);
* :mod:`ui.progress`: library jobs rendered with ``gr.Progress``, the Stop button's cancel events;
* :mod:`ui.forms`: form widgets <-> recipe YAML, generated from the method registries;
* :mod:`ui.plots`: the figures;
* :mod:`ui.workbench` and ``ui.handlers_*``: the handlers (widget values -> library calls -> widgets);
* :mod:`ui.layout` and ``ui.tab_*``: the page and its wiring;
* :mod:`ui.server`: ``serve`` (``weightsmith serve``, ``make run``, ``python app.py``).
"""
