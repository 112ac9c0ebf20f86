"""``weightsmith push DIR REPO_ID``: publish an output folder to the Hub in one commit."""

from __future__ import annotations

import argparse
import logging


def _push(args: argparse.Namespace) -> int:
    from .hub import push_folder

    if not getattr(args, "verbose", False):
        # One line per HTTP request is noise on a terminal; -v shows them.
        for name in ("httpx2", "httpx", "httpcore2", "httpcore"):
            logging.getLogger(name).setLevel(logging.WARNING)

    def progress(fraction: float, text: str) -> None:
        print(f"[{fraction:4.0%}] {text}", flush=True)

    result = push_folder(args.folder, args.repo_id, token=args.token, private=args.private,
                         revision=args.revision, create_pr=args.create_pr, commit_message=args.message,
                         progress=progress)
    print(f"pushed {len(result.files)} files to {result.repo_url}")
    if result.pr_url:
        print(f"pull request: {result.pr_url}")
    print(f"commit: {result.commit_url}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "push",
        help="publish an output folder (with its README.md card) to the Hugging Face Hub in one commit",
        description="Create the repo if needed and upload every file of DIR in a single commit. "
                    "Token: --token, else HF_TOKEN, else the stored `hf auth login`.",
    )
    p.add_argument("folder", metavar="DIR", help="output folder of merge / mix / edit (must hold README.md)")
    p.add_argument("repo_id", metavar="REPO_ID", help="owner/name on the Hub")
    p.add_argument("--private", action="store_true", help="create the repo private (ignored if it exists)")
    p.add_argument("--token", help="Hugging Face write token (prefer HF_TOKEN: command lines are visible to "
                                   "other users of this machine)")
    p.add_argument("--revision", help="branch to commit to (created from main if missing)")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing directly")
    p.add_argument("-m", "--message", help="commit message")
    p.set_defaults(func=_push)
