"""``weightsmith moe CONFIG.yaml OUT_DIR``: assemble a mixture of experts (mergekit-moe's config) with a tqdm bar."""

from __future__ import annotations

import argparse
from pathlib import Path

from checkpoints.sizes import parse_size


def _moe(args: argparse.Namespace) -> int:
    from .commands import open_recipe, with_bar
    from .moe import MoeConfig, build_moe

    config = MoeConfig.from_yaml(Path(open_recipe(args.config)))
    result = with_bar("assembling MoE", lambda job: build_moe(
        config, Path(args.out_dir), job=job, device=args.device, seed=args.seed,
        allow_all_same=args.i_understand_this_is_not_useful_without_training, overwrite=args.allow_overwrite,
        max_shard_bytes=parse_size(args.max_shard_size, what="--max-shard-size"), load_check=args.load_check))
    extra = f"; degenerate routing in layers {result.degenerate_layers}" if result.degenerate_layers else ""
    shared = f", {result.shared_experts} shared" if result.shared_experts else ""
    print(f"wrote {result.out_dir} ({result.architecture}, {result.num_experts} experts{shared}, "
          f"{result.experts_per_token} per token, gate_mode {result.gate_mode}, {result.tensors_written} tensors, "
          f"{result.seconds:.1f} s; {result.finite_check}{extra})")
    print(f"check: {result.load_check}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("moe", help="assemble a mixture of experts from dense models (mergekit-moe's YAML config)")
    p.add_argument("config", help="mergekit-moe config: base_model, experts [{source_model, positive_prompts, "
                                  "negative_prompts}], shared_experts (one: Qwen2-MoE), gate_mode "
                                  "(hidden|cheap_embed|random|...), dtype, experts_per_token")
    p.add_argument("out_dir", help="output folder (must not exist unless --allow-overwrite)")
    p.add_argument("--device", default="cpu", help="where gate_mode hidden runs the base model (default cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed of gate_mode random/uniform_random and noise_scale")
    p.add_argument("--max-shard-size", default="5GB", help="largest output shard, e.g. 2GB or 500M (default 5GB)")
    p.add_argument("--allow-overwrite", action="store_true", help="replace OUT_DIR if it exists")
    p.add_argument("--load-check", action=argparse.BooleanOptionalAction, default=None,
                   help="load the output in transformers and run each expert's first prompt before keeping it "
                        "(default: when the weights are at most 4 GB)")
    p.add_argument("--i-understand-this-is-not-useful-without-training", action="store_true",
                   help="build even when every expert is the same model (as mergekit-moe's flag)")
    p.set_defaults(func=_moe)
