"""``weightsmith export-gguf``: a model, or a PEFT LoRA adapter folder, to one GGUF file."""

from __future__ import annotations

import argparse


def _export_gguf(args: argparse.Namespace) -> int:
    import logging

    from merging.gguf_adapter import export_adapter_gguf, is_adapter_folder

    if not args.verbose:
        logging.getLogger("gguf").setLevel(logging.WARNING)  # the writer's own notes name the temp file

    if is_adapter_folder(args.model):
        from merging.adapters import load_adapter
        from merging.gguf_adapter import base_checkpoint, check_adapter_gguf

        adapter = load_adapter(args.model)
        base = base_checkpoint(adapter, args.base)
        result = export_adapter_gguf(args.model, args.out, base=base, qtype=args.type, overwrite=args.overwrite)
        check = (lambda: check_adapter_gguf(result.path, adapter, base))
    else:
        from checkpoints.gguf_check import check_gguf
        from checkpoints.gguf_export import export_gguf
        from checkpoints.sources import resolve

        ckpt = resolve(args.model)
        result = export_gguf(ckpt, args.out, qtype=args.type, overwrite=args.overwrite)
        check = (lambda: check_gguf(result.path, ckpt))
    print(result.summary())
    if args.check:
        report = check()
        print(report.summary())
        return 0 if report.ok else 1
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from checkpoints.gguf_export import GGUF_TYPES

    p = sub.add_parser("export-gguf", help="write a model (or a LoRA adapter folder) as one GGUF file for llama.cpp")
    p.add_argument("model", help="demo, a folder, a .safetensors/.gguf file, a Hub id, or a PEFT adapter folder")
    p.add_argument("out", help="the .gguf file to write")
    p.add_argument("--type", default="q8_0", choices=list(GGUF_TYPES),
                   help="tensor type (default q8_0); adapters: f32, f16, bf16 or q8_0")
    p.add_argument("--base", help="for an adapter: the base model it applies to (default: the one its config names)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")
    p.add_argument("--check", action="store_true",
                   help="read the file back and hold every value to its type's error bound (takes a while)")
    p.set_defaults(func=_export_gguf)
