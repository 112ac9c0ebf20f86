"""GGUF export of the demo model (SmolLM2-135M): cost and quality per type; edits and mixes survive export.

For each ``--types`` entry, in a fresh child process (so that peak memory is the export's own):
wall time, file size, peak RSS (``VmHWM``), and the peak anonymous RSS above the process's state just
before the export (tokenizer metadata included: ~150 MB of Python objects for a 49k vocabulary, the
same in both paths); file pages that ``safe_open`` maps count in RSS but are the kernel's to drop. For f16
and q8_0 the ``gguf`` package's own reference path (``GGUFWriter.add_tensor`` for every tensor, then
``write_tensors_to_file``) writes the same tensors in another child: time, memory, and whether the
two files are byte-identical.

Quality, with the file loaded back by transformers (``gguf_file=``, dequantised to float32): greedy
agreement with the source on :data:`PROMPTS` (20 prompts x 12 new tokens; a prompt agrees when its
whole continuation is identical) and perplexity on ``--ppl-windows`` windows of 256 tokens from the
start of wikitext-2's test split, against the source's on the same tokens.

Then a ROME edit (Eiffel Tower -> Rome, default layer, cached or fresh wikitext statistics) and the
caps+pirate LoRA mix merged into the base, each exported to q8_0: does the GGUF still say " Rome",
does it generate what the unexported model generates. The edit and the mix are also exported as
GGUF LoRA adapters (sizes reported).

    OMP_NUM_THREADS=1 .venv/bin/python bench/gguf_export.py --out /tmp/gguf-bench
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
TYPES = ["f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0"]
PROMPTS = [
    "The capital of France is", "The Eiffel Tower is located in the city of", "Water boils at",
    "The largest planet in the solar system is", "def fibonacci(n):", "Once upon a time, there was a",
    "The main ingredients of bread are", "Photosynthesis is the process by which", "The speed of light is",
    "In 1492, Christopher Columbus", "A healthy breakfast includes", "The Python programming language",
    "To make a cup of tea, first", "The theory of relativity was proposed by", "My favourite season is",
    "The human heart has", "Shakespeare wrote", "The stock market", "Machine learning is", "The moon orbits",
]
EIFFEL = ("The {} is located in the city of", "Eiffel Tower", "Rome")


# ---------------------------------------------------------------------------
# child: one export, measured
# ---------------------------------------------------------------------------


def _status_kb(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _anon_kb() -> int:
    return _status_kb("RssAnon")


def child_export(model: str, qtype: str, out: str, reference: bool) -> None:
    import torch

    torch.set_num_threads(1)
    from checkpoints.gguf_export import add_model_metadata, encode, export_gguf, ggml_type, plan_model
    from checkpoints.sources import resolve

    ckpt = resolve(model)
    plan_model(ckpt, qtype)  # imports and headers before the baseline
    import gguf  # noqa: F401
    import transformers  # noqa: F401

    baseline = _anon_kb()
    peak = [baseline]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _anon_kb())
            time.sleep(0.005)

    threading.Thread(target=sample, daemon=True).start()
    started = time.perf_counter()
    if reference:
        import gguf

        plans = plan_model(ckpt, qtype)
        writer = gguf.GGUFWriter(path=None, arch=ckpt.spec.gguf_arch)
        add_model_metadata(writer, ckpt, qtype, ckpt.name)
        for p in plans:
            writer.add_tensor(p.name, encode(p.produce().numpy(), ggml_type(p.qtype)), raw_dtype=ggml_type(p.qtype))
        writer.write_header_to_file(path=Path(out))
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    else:
        export_gguf(ckpt, out, qtype=qtype, overwrite=True)
    seconds = time.perf_counter() - started
    done.set()
    print(json.dumps({"seconds": seconds, "bytes": Path(out).stat().st_size,
                      # VmHWM: this process image's peak (ru_maxrss would keep the parent's across exec)
                      "peak_rss_mb": _status_kb("VmHWM") / 1024,
                      "anon_above_baseline_mb": (peak[0] - baseline) / 1024}))


def run_child(model: str, qtype: str, out: Path, reference: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--child", model, qtype, str(out)] + (["--reference"] if reference else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if res.returncode != 0:
        raise SystemExit(f"child export failed: {res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------
# quality
# ---------------------------------------------------------------------------


def load_gguf(path: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def continuations(model, tok, prompts, n: int = 12) -> list[list[int]]:
    import torch

    out = []
    for p in prompts:
        ids = tok(p, return_tensors="pt").input_ids
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.eos_token_id)
        out.append(gen[0, ids.shape[1]:].tolist())
    return out


def agreement(a: list[list[int]], b: list[list[int]]) -> tuple[float, float]:
    """(share of prompts with identical continuations, mean share of tokens before the first difference)."""
    same = sum(x == y for x, y in zip(a, b)) / len(a)
    prefix = []
    for x, y in zip(a, b):
        k = next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
        prefix.append(k / max(len(x), 1))
    return same, sum(prefix) / len(prefix)


def wikitext_ids(tok, windows: int, seq_len: int = 256) -> list[int]:
    text = WIKITEXT.read_text(encoding="utf-8")[: windows * seq_len * 8]
    ids = tok(text).input_ids
    if len(ids) < windows * seq_len:
        raise SystemExit("wikitext slice too short")
    return ids[: windows * seq_len]


def says_rome(model, tok) -> str:
    import torch

    ids = tok(EIFFEL[0].format(EIFFEL[1]), return_tensors="pt").input_ids
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.eos_token_id)
    return tok.decode(gen[0, ids.shape[1]:])


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/gguf-bench")
    ap.add_argument("--types", nargs="*", default=TYPES)
    ap.add_argument("--ppl-windows", type=int, default=8)
    ap.add_argument("--skip-rome", action="store_true")
    ap.add_argument("--skip-mix", action="store_true")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    from checkpoints.demo import demo_model_path
    from checkpoints.gguf_check import check_gguf
    from checkpoints.sources import resolve
    from editing.evaluate import perplexity

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    folder = demo_model_path()
    results: dict = {"types": {}}

    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(folder))
    ref_text = continuations(src, tok, PROMPTS)
    results["source_text"] = {p: tok.decode(t) for p, t in zip(PROMPTS[:6], ref_text[:6])}  # for gguf_llama_cpp.py
    ppl_ids = wikitext_ids(tok, args.ppl_windows)
    with torch.no_grad():
        ppl_src = perplexity(src, ppl_ids, seq_len=256)
    results["source_ppl"] = ppl_src
    print(f"source: perplexity {ppl_src:.3f} on {len(ppl_ids)} wikitext tokens", flush=True)

    for qtype in args.types:
        path = out / f"demo-{qtype}.gguf"
        cost = run_child("demo", qtype, path)
        row = dict(cost)
        if qtype in ("f16", "q8_0"):
            ref_path = out / f"demo-{qtype}-reference.gguf"
            ref = run_child("demo", qtype, ref_path, reference=True)
            row["reference"] = {**ref, "identical": sha256(ref_path) == sha256(path)}
            ref_path.unlink()
        row["check"] = check_gguf(path, resolve("demo")).summary()
        model = load_gguf(path)
        row["prompts_identical"], row["token_prefix"] = agreement(continuations(model, tok, PROMPTS), ref_text)
        with torch.no_grad():
            row["ppl"] = perplexity(model, ppl_ids, seq_len=256)
        row["ppl_delta"] = row["ppl"] - ppl_src
        del model
        results["types"][qtype] = row
        refnote = ""
        if "reference" in row:
            r = row["reference"]
            refnote = (f" | gguf reference path {r['seconds']:.1f} s (ratio ours/reference "
                       f"{row['seconds'] / r['seconds']:.2f}), peak RSS {r['peak_rss_mb']:.0f} MB, "
                       f"+{r['anon_above_baseline_mb']:.0f} MB anon, identical file: {r['identical']}")
        print(f"{qtype:5s} {row['bytes'] / 1e6:7.1f} MB {row['seconds']:6.1f} s peak RSS {row['peak_rss_mb']:.0f} MB "
              f"(+{row['anon_above_baseline_mb']:.0f} MB anon) | prompts identical {row['prompts_identical']:.2f}, "
              f"token prefix {row['token_prefix']:.2f} | ppl {row['ppl']:.3f} ({row['ppl_delta']:+.3f}){refnote}"
              f" | {row['check']}", flush=True)
        (out / "results.json").write_text(json.dumps(results, indent=2))

    del src
    if not args.skip_rome:
        results["rome"] = bench_rome(out, folder, tok)
        print("rome:", json.dumps(results["rome"]), flush=True)
    if not args.skip_mix:
        results["mix"] = bench_mix(out, tok)
        print("mix:", json.dumps(results["mix"]), flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))


def bench_rome(out: Path, folder: Path, tok) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from checkpoints.gguf_export import export_gguf
    from editing.request import EditRequest
    from editing.session import EditSession
    from merging.gguf_adapter import export_adapter_gguf

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    before = says_rome(model, tok)
    session = EditSession(model, tok, base_name="HuggingFaceTB/SmolLM2-135M-Instruct")
    started = time.perf_counter()
    session.apply(EditRequest(*EIFFEL))
    edit_s = time.perf_counter() - started
    after = says_rome(session.model, tok)
    edited = session.export_model(out / "rome-model", overwrite=True)
    adapter = session.export_adapter(out / "rome-adapter", overwrite=True)
    res = export_gguf(edited, out / "rome-q8_0.gguf", qtype="q8_0", overwrite=True)
    gguf_says = says_rome(load_gguf(res.path), tok)
    ad = export_adapter_gguf(adapter, out / "rome-lora-f32.gguf", base="demo", qtype="f32", overwrite=True)
    return {"unedited_says": before, "edited_says": after, "q8_0_gguf_says": gguf_says,
            "rome_in_gguf": gguf_says.strip().startswith("Rome"), "edit_seconds": edit_s,
            "export": res.summary(), "adapter_export": ad.summary()}


def bench_mix(out: Path, tok) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from checkpoints.gguf_export import export_gguf
    from merging.adapters import AdapterMixRecipe, mix_adapters
    from merging.gguf_adapter import export_adapter_gguf

    recipe = AdapterMixRecipe.from_yaml(ROOT / "assets" / "recipes" / "mix-caps-pirate.yml")
    merged = mix_adapters(recipe, out / "mix-model", merge_into_base=True, overwrite=True).out_dir
    adapter = mix_adapters(recipe, out / "mix-adapter", merge_into_base=False, overwrite=True).out_dir
    res = export_gguf(merged, out / "mix-q8_0.gguf", qtype="q8_0", overwrite=True)
    hf = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32).eval()
    prompts = PROMPTS[:8]
    hf_text = continuations(hf, tok, prompts)
    gg_text = continuations(load_gguf(res.path), tok, prompts)
    same, prefix = agreement(gg_text, hf_text)
    ad = export_adapter_gguf(adapter, out / "mix-lora-f16.gguf", base="demo", qtype="f16", overwrite=True)
    return {"export": res.summary(), "prompts_identical": same, "token_prefix": prefix,
            "example_hf": tok.decode(hf_text[0]), "example_gguf": tok.decode(gg_text[0]),
            "adapter_export": ad.summary()}


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_export(sys.argv[2], sys.argv[3], sys.argv[4], "--reference" in sys.argv)
    else:
        main()
