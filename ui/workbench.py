"""Every handler of the app on one object: the tab mixins over :class:`ui.workbench_base.WorkbenchBase`.

Build one per server (:func:`ui.layout.build_app` does); tests call the handlers directly with a
stand-in request (anything with a ``session_hash``).
"""

from .handlers_adapters import AdapterHandlers
from .handlers_edit import EditHandlers
from .handlers_eval import EvalHandlers
from .handlers_evolve import EvolveHandlers
from .handlers_export import ExportHandlers
from .handlers_merge import MergeHandlers
from .handlers_models import ModelsHandlers
from .handlers_moe import MoeHandlers
from .workbench_base import WorkbenchBase


class Workbench(ModelsHandlers, MergeHandlers, AdapterHandlers, EditHandlers, EvalHandlers, EvolveHandlers, ExportHandlers,
                MoeHandlers, WorkbenchBase):
    """The app's handlers (one mixin per tab) with the server's sessions, policy and jobs."""
