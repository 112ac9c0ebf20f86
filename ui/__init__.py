"""Weightsmith's web UI (Gradio): widgets over the library, one job per module.

``app.py`` (what Spaces run) builds and launches it. Modules:

* :mod:`ui.config`: server policy and limits (``AppConfig``), what ``queue``/``launch`` take;
* :mod:`ui.endpoint`: what every endpoint does around its handler (typed arguments, one-line errors);
* :mod:`ui.progress`: library jobs rendered with ``gr.Progress`` (``gradio_job``), the Stop button's events;
* :mod:`ui.workbench_base`: sessions mapped to private workspaces, the resolver policy, running jobs;
* ``ui.handlers_{models,merge,adapters,edit,export}``: the handlers of each tab (widget values ->
  library calls -> widgets), assembled on :class:`ui.workbench.Workbench`;
* :mod:`ui.forms`: form widgets <-> recipe YAML, generated from the method registries;
* :mod:`ui.plots`, :mod:`ui.tables`, :mod:`ui.widgets`: figures, result tables, shared widget groups;
* :mod:`ui.layout` and ``ui.tab_{merge,adapters,edit}``: the page and its wiring;
* :mod:`ui.server`: ``serve`` (``weightsmith serve``, ``make run``, ``python app.py``).
"""
