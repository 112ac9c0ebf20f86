"""Foundation subcommands: ``demo-model``, ``info`` (``serve`` is the top-level ``cli``'s: it starts the app)."""

from __future__ import annotations

import argparse
import json


def _demo_model(args: argparse.Namespace) -> int:
    from .demo import demo_model_path

    print(demo_model_path())
    return 0


def _info(args: argparse.Namespace) -> int:
    from .sources import resolve

    ckpt = resolve(args.model, config_from=args.config_from)
    ckpt.check_matches_config()
    info = ckpt.summary()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(len(k) for k in info)
        for key, value in info.items():
            if isinstance(value, list):
                value = ", ".join(value)
            elif key == "parameters":
                value = f"{value:,}"
            print(f"{key:<{width}}  {value}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo-model", help="prepare the bundled SmolLM2-135M-Instruct and print its folder")
    p.set_defaults(func=_demo_model)

    p = sub.add_parser("info", help="print architecture, layers, parameters, dtype and files of a model")
    p.add_argument("model", help="demo, a folder, a .safetensors/.gguf file, or a Hub id")
    p.add_argument("--config-from", help="model whose config a bare weights file uses")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_info)
