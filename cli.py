"""``weightsmith`` command line: argument parsing only; the work is in the library.

This module sits on top of the house, beside ``app.py``: it imports the feature
packages (``merging``, ``editing``) and the ground floor (``checkpoints``), and
nothing below imports it. Each package contributes its subcommands through a
``register(subparsers)`` function, called here by name. ``serve`` lives here
because it starts the app, which ``checkpoints`` must never import.

A :class:`WeightsmithError` prints one line and exits with status 2, with no
traceback; so does a full disk or a read-only output
(:func:`checkpoints.staging.output_error`). Logging is set up with
:func:`checkpoints.secrets.install_redaction` first, so no log line (any
logger, any level, ``-v`` included) and no error shows a token.
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys

from checkpoints import commands as checkpoint_commands
from checkpoints import hub_commands
from checkpoints.errors import WeightsmithError
from checkpoints.secrets import install_redaction, redact
from checkpoints.staging import output_error
from editing import commands as edit_commands
from evaluation import commands as eval_commands
from merging import adapter_commands
from merging import commands as merge_commands
from merging import evolve_commands
from merging import gguf_commands
from merging import moe_commands


def _serve(args: argparse.Namespace) -> int:
    import app  # lazily: gradio is heavy, and only this command needs it

    app.serve(host=args.host, port=args.port, allow_paths=args.allow_local_paths, share=False,
              max_file_size=args.max_file_size, workspace_max_age=args.workspace_max_age,
              workspace_quota=args.workspace_quota, queue_size=args.queue_size)
    return 0


def register_serve(sub: argparse._SubParsersAction) -> None:
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


def _demo_model(args: argparse.Namespace) -> int:
    from checkpoints.demo import demo_model_path
    from checkpoints.jobs import tqdm_job
    from editing.prepare import prepare_statistics

    path = demo_model_path()
    if not args.no_stats:
        # The app's first edit would otherwise sample these for minutes with nothing to show for it.
        with tqdm_job("demo model: editing statistics") as job:
            prepare_statistics("demo", job=job)
    print(path)
    return 0


def extend_demo_model(sub: argparse._SubParsersAction) -> None:
    """``demo-model`` (registered by ``checkpoints``) also prepares the demo's editing statistics here:
    ``checkpoints`` never imports ``editing``, and this module may import both."""
    p = sub.choices["demo-model"]
    p.description = ("Prepare the bundled SmolLM2-135M-Instruct, and the editing statistics of its default "
                     "layers in the cache the app reads, then print its folder.")
    p.add_argument("--no-stats", action="store_true",
                   help="skip the editing statistics (the app's first edit then computes them)")
    p.set_defaults(func=_demo_model)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="weightsmith",
        description="Merge checkpoints, mix LoRA adapters, edit facts with ROME, publish to the Hub.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    merge_commands.register(sub)
    adapter_commands.register(sub)
    gguf_commands.register(sub)
    moe_commands.register(sub)
    checkpoint_commands.register(sub)
    extend_demo_model(sub)
    register_serve(sub)
    hub_commands.register(sub)
    edit_commands.register(sub)
    eval_commands.register(sub)
    evolve_commands.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    install_redaction()
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        code = args.func(args)
    except WeightsmithError as e:
        print(f"weightsmith: error: {redact(e)}", file=sys.stderr)
        return 2
    except OSError as e:
        known = output_error(e)
        if known is None:
            raise
        print(f"weightsmith: error: {redact(known)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("weightsmith: cancelled", file=sys.stderr)
        return 130
    return int(code or 0)


def run() -> None:
    """Console-script entry point: :func:`main`, then exit with its status.

    Before exiting, the objects left (torch's Python side is large) are frozen out
    of the garbage collector: the collection at interpreter exit otherwise walks them
    all, ~0.3 s of every command here (measured: ``import torch`` alone exits in 1.57 s,
    1.34 s with the freeze). Only for a process that ends now; :func:`main` stays free of it.
    """
    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    run()
