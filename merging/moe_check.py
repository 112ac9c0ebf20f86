"""The check of an assembled mixture of experts: transformers loads it and runs the experts' prompts.

Cheap next to the assembly (one forward pass per expert on its first positive prompt), and it tells
the user what the router rows promise: the prompt an expert was given should be routed to that expert.
The forward runs in the stored dtype, so an output that overflows in bfloat16 or float16 is caught too.

Example::

    check = check_output(folder, layout, [e.prompts for e in config.experts], device="cpu")
    print(check.summary())   # loads as MixtralForCausalLM, logits finite; routing ...
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from checkpoints.arch import MoeLayout
from checkpoints.errors import WeightsmithError
from checkpoints.jobs import Job, ensure
from checkpoints.tensors import weight_files

from .moe_gates import Prompts, prompt_ids

log = logging.getLogger(__name__)

LOAD_CHECK_BYTES = 4 * 10**9  # above this the automatic check is skipped (it holds the whole model in memory)


@dataclass
class LoadCheck:
    architecture: str
    logits_finite: bool
    # expert -> (layers whose top-1 choice for its first prompt's last token is that expert, layers)
    routing: dict[int, tuple[int, int]] = field(default_factory=dict)

    def summary(self) -> str:
        text = f"loads as {self.architecture} without remote code, logits finite"
        if self.routing:
            text += "; top-1 routing of each expert's first prompt (last token): " + ", ".join(
                f"expert {e} in {hit}/{layers} layers" for e, (hit, layers) in self.routing.items())
        return text


def check_wanted(folder: Path, wanted: bool | None) -> bool:
    if wanted is not None:
        return wanted
    return sum(f.stat().st_size for f in weight_files(folder)) <= LOAD_CHECK_BYTES


def check_output(folder: Path, layout: MoeLayout, prompts: list[Prompts], *, device: str | torch.device = "cpu",
                 job: Job | None = None) -> LoadCheck:
    """Load ``folder`` with ``AutoModelForCausalLM`` and run each expert's first positive prompt (or the
    BOS token when no expert has prompts); one error line when it does not load or gives NaN/Inf."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from checkpoints.build_lock import building_models

    job = ensure(job)
    job.progress(None, "loading the MoE in transformers")
    dtype = json.loads((folder / "config.json").read_text()).get("dtype") or "float32"
    try:
        with building_models():
            model, info = AutoModelForCausalLM.from_pretrained(str(folder), dtype=getattr(torch, dtype),
                                                               trust_remote_code=False, output_loading_info=True)
    except Exception as e:  # transformers' own message names what it refused
        raise WeightsmithError(f"the assembled {layout.architecture} does not load in transformers: "
                               f"{str(e).splitlines()[0] if str(e) else type(e).__name__}; nothing was kept") from None
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        kind, names = next(iter(bad.items()))
        raise WeightsmithError(f"the assembled {layout.architecture} does not fit transformers' model: "
                               f"{kind.replace('_', ' ')} {sorted(names)[:3]}; nothing was kept")
    model = model.eval().to(device)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    check = LoadCheck(architecture=type(model).__name__, logits_finite=True)
    runs = [(e, p.positive[0]) for e, p in enumerate(prompts) if p.positive] or [(None, "")]
    for done, (expert, prompt) in enumerate(runs):
        job.check("the MoE load check")
        ids = torch.tensor([prompt_ids(tokenizer, prompt) if prompt else [_first_id(tokenizer)]], device=device)
        with torch.no_grad():
            out = model(input_ids=ids, output_router_logits=expert is not None)
        if not bool(torch.isfinite(out.logits).all()):
            raise WeightsmithError(f"the assembled {layout.architecture} gives NaN/Inf logits"
                                   + (f" on expert {expert}'s prompt {prompt!r}" if expert is not None else "")
                                   + "; nothing was kept")
        if expert is not None:
            picks = [int(r.reshape(-1, r.shape[-1])[-1].argmax()) for r in out.router_logits]
            check.routing[expert] = (sum(p == expert for p in picks), len(picks))
        job.step(done + 1, len(runs), "load check")
    log.info("MoE check: %s", check.summary())
    return check


def _first_id(tokenizer) -> int:
    """A prompt of one token when no expert has prompts (random gates): BOS, else EOS, else id 0."""
    token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return int(token_id) if token_id is not None else 0
