"""Foundation subcommands: ``demo-model``, ``info``, ``serve``."""

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


def _serve(args: argparse.Namespace) -> int:
    import app

    app.serve(host=args.host, port=args.port, allow_paths=args.allow_local_paths, share=False,
              max_file_size=args.max_file_size, workspace_max_age=args.workspace_max_age,
              workspace_quota=args.workspace_quota, queue_size=args.queue_size)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo-model", help="prepare the bundled SmolLM2-135M-Instruct and print its folder")
    p.set_defaults(func=_demo_model)

    p = sub.add_parser("info", help="print architecture, layers, parameters, dtype and files of a model")
    p.add_argument("model", help="demo, a folder, a .safetensors/.gguf file, or a Hub id")
    p.add_argument("--config-from", help="model whose config a bare weights file uses")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_info)

    p = sub.add_parser("serve", help="serve the web app")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--allow-local-paths", action="store_true",
                   help="let users name folders on this server (off by default: only uploads, demo and Hub ids)")
    p.add_argument("--max-file-size", default="2gb", help="upload size limit, e.g. 500mb")
    p.add_argument("--workspace-max-age", type=float, default=3600.0,
                   help="seconds after which a session's workspace is deleted")
    p.add_argument("--workspace-quota", default="20GiB",
                   help="disk space per session: uploads, results and downloads (e.g. 5GB)")
    p.add_argument("--queue-size", type=int, default=64,
                   help="requests that may wait in the queue; more are refused with 'queue full'")
    p.set_defaults(func=_serve)
