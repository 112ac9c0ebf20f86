"""LoRA adapters: load, check against a base, mix with weights, scale by depth, write.

This is where users look; the work is done in small modules, one job each:

* :mod:`checkpoints.peft_adapter`: adapter files (read, check, write, base plus adapter);
* :mod:`merging.adapter_files`: adapters named by reference (folder, uploads, Hub id, demo);
* :mod:`merging.adapter_methods`: the mixing methods as data (:data:`ADAPTER_METHODS`);
* :mod:`merging.adapter_recipe`: the mix recipe (YAML ⇄ :class:`AdapterMixRecipe`);
* :mod:`merging.adapter_mix`: :func:`mix_adapters` (PEFT's ``add_weighted_adapter`` + LiNeS);
* :mod:`merging.adapter_merge`: :func:`write_merged_model` (a full model, streamed).

Example::

    recipe = AdapterMixRecipe.from_yaml(Path("assets/recipes/mix-caps-pirate.yml"))
    result = mix_adapters(recipe, Path("out/caps-pirate"))
    result.out_dir, result.rank, result.exact_in_delta_w
"""

from __future__ import annotations

from checkpoints.peft_adapter import (
    CONFIG_NAME,
    HUB_ADAPTER_PATTERNS,
    PEFT_PREFIX,
    PICKLE_WEIGHTS_NAME,
    WEIGHTS_NAME,
    LoraAdapter,
    attach_adapters,
    compact_targets,
    write_adapter,
)
from merging.adapter_files import check_compatible, demo_adapters, find_adapter_files, load_adapter
from merging.adapter_merge import write_merged_model
from merging.adapter_methods import ADAPTER_METHODS, AdapterMethod, lines_lambda
from merging.adapter_mix import MIX_NAME, MixResult, few_threads, mix_adapters, skeleton_model
from merging.adapter_recipe import AdapterEntry, AdapterMixRecipe
from merging.lines import LinesConfig

__all__ = [
    "ADAPTER_METHODS", "CONFIG_NAME", "HUB_ADAPTER_PATTERNS", "MIX_NAME", "PEFT_PREFIX", "PICKLE_WEIGHTS_NAME",
    "WEIGHTS_NAME", "AdapterEntry", "AdapterMethod", "AdapterMixRecipe", "LinesConfig", "LoraAdapter", "MixResult",
    "attach_adapters", "check_compatible", "compact_targets", "demo_adapters", "few_threads", "find_adapter_files",
    "lines_lambda", "load_adapter", "mix_adapters", "skeleton_model", "write_adapter", "write_merged_model",
]
