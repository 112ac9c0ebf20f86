"""Run the files bench/gguf_export.py wrote in llama.cpp itself (through ``llama_cpp``, if installed).

Needs only the ``llama-cpp-python`` package (no torch): run it with the Python that has it, e.g. a
separate venv. Reads ``results.json`` from the bench's ``--out`` folder for the source model's greedy
texts, then, with temperature 0 and one thread:

* ``demo-<type>.gguf``: the continuation of each saved prompt, compared with the source's;
* ``rome-q8_0.gguf``: what the ROME-edited model says about the Eiffel Tower (should start with " Rome");
* with ``--tokenizer`` (a ``tokenizer.json``, e.g. the demo folder's): llama.cpp's token ids for
  :data:`SPLITS` against that tokenizer's (digits and the spaces before them, which SmolLM's ``smollm``
  pre-tokenizer splits unlike GPT-2's).

    /tmp/llcpp-venv/bin/python bench/gguf_llama_cpp.py --out /tmp/gguf-bench
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


SPLITS = ["12345", "In 1492, Christopher Columbus", "x =  12", "3.14159 and 2,718"]


def complete(llm, prompt: str, n: int) -> str:
    out = llm.create_completion(prompt, max_tokens=n, temperature=0.0, top_k=1)
    return out["choices"][0]["text"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/gguf-bench")
    ap.add_argument("--types", nargs="*", default=["f16", "q8_0", "q4_0"])
    ap.add_argument("--tokenizer", help="a tokenizer.json to compare llama.cpp's token ids with")
    args = ap.parse_args()
    try:
        from llama_cpp import Llama
    except ImportError:
        raise SystemExit("llama_cpp is not installed in this Python: pip install llama-cpp-python")
    out = Path(args.out)
    results = json.loads((out / "results.json").read_text())
    texts: dict[str, str] = results.get("source_text", {})
    report: dict = {}
    for qtype in args.types:
        path = out / f"demo-{qtype}.gguf"
        if not path.is_file():
            continue
        started = time.perf_counter()
        llm = Llama(model_path=str(path), n_threads=1, n_ctx=256, verbose=False)
        load_s = time.perf_counter() - started
        same = 0
        for prompt, expected in texts.items():
            got = complete(llm, prompt, 12)
            same += got.startswith(expected) or expected.startswith(got)
            print(f"{qtype}: {prompt!r} -> {got!r} (source {expected!r})")
        report[qtype] = {"load_seconds": load_s, "prompts_identical": same / max(len(texts), 1)}
        if args.tokenizer:
            report[qtype]["tokens_as_source"] = same_tokens(llm, args.tokenizer)
        del llm
    rome = out / "rome-q8_0.gguf"
    if rome.is_file():
        llm = Llama(model_path=str(rome), n_threads=1, n_ctx=256, verbose=False)
        said = complete(llm, "The Eiffel Tower is located in the city of", 4)
        report["rome_q8_0_says"] = said
        report["rome_in_llama_cpp"] = said.strip().startswith("Rome")
        print(f"rome-q8_0: {said!r}")
    print(json.dumps(report, indent=2))
    (out / "llama_cpp.json").write_text(json.dumps(report, indent=2))


def same_tokens(llm, tokenizer_json: str) -> dict[str, bool]:
    """For each of :data:`SPLITS`: does llama.cpp tokenise it as the ``tokenizers`` tokenizer does?"""
    from tokenizers import Tokenizer

    ref = Tokenizer.from_file(tokenizer_json)
    out = {}
    for text in SPLITS:
        mine = llm.tokenize(text.encode(), add_bos=False, special=False)
        theirs = ref.encode(text, add_special_tokens=False).ids
        out[text] = mine == theirs
        print(f"tokens {text!r}: llama.cpp {mine} {'==' if mine == theirs else '!='} tokenizer {theirs}")
    return out


if __name__ == "__main__":
    main()
