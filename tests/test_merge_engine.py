"""The streaming engine end to end: sharding, tied heads, Conv1D models, card, cancel, CLI."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
import yaml

from checkpoints.errors import WeightsmithError
from checkpoints.tensors import CheckpointReader
from merging.engine import MergeCancelled, run_merge
from merging.recipe import MergeRecipe


def load(folder: Path) -> dict[str, torch.Tensor]:
    r = CheckpointReader.from_folder(Path(folder))
    return {k: r.get(k) for k in r.keys()}


def ties_recipe(base: Path, fts: list[Path], extra: str = "") -> MergeRecipe:
    models = "".join(f"  - model: {f}\n    parameters: {{weight: 0.5, density: 0.6}}\n" for f in fts)
    return MergeRecipe.from_yaml(f"merge_method: ties\nbase_model: {base}\nmodels:\n{models}{extra}")


def test_gpt2_conv1d_sharded_tied(tmp_path, tiny_gpt2_family):
    from transformers import AutoModelForCausalLM

    f = tiny_gpt2_family
    out = tmp_path / "merged"
    calls = []
    res = run_merge(ties_recipe(f["base"], [f["ft1"], f["ft2"]], "lines: {alpha: 0.5, beta: 0.5}\n"), out,
                    max_shard_bytes=20_000, progress=lambda d, n, name: calls.append((d, n)))
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 2 and (out / "model.safetensors.index.json").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    merged = load(out)
    base = load(f["base"])
    assert set(index) == set(merged) == set(base)  # tied lm_head not written, nothing lost
    assert "lm_head.weight" not in merged
    # Conv1D weights keep their stored [in, out] layout
    assert merged["transformer.h.0.mlp.c_fc.weight"].shape == base["transformer.h.0.mlp.c_fc.weight"].shape == (32, 128)
    assert not torch.equal(merged["transformer.h.1.attn.c_attn.weight"], base["transformer.h.1.attn.c_attn.weight"])
    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(model.lm_head.weight, model.transformer.wte.weight)  # still tied after loading
    assert torch.equal(model.transformer.wte.weight, merged["transformer.wte.weight"])
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
    assert calls[-1][0] == calls[-1][1] == res.tensors_total
    assert res.block_norms and all(len(v) == 4 and min(v) > 0 for v in res.block_norms.values())
    card = (out / "README.md").read_text()
    for needle in ("merge", "weightsmith", "lines", "https://arxiv.org/abs/2306.01708", "```yaml"):
        assert needle in card
    assert str(tmp_path) not in card and str(tmp_path) not in (out / "weightsmith_recipe.yml").read_text()
    assert MergeRecipe.from_yaml((out / "weightsmith_recipe.yml").read_text()).merge_method == "ties"
    assert (out / "tokenizer.json").exists() and (out / "config.json").exists()


def test_llama_tied_head_and_out_dtype(tmp_path, tiny_llama_tied_dir):
    from conftest import build_tiny_llama, perturbed, save_model

    ft = save_model(perturbed(build_tiny_llama(0, tie=True), seed=5), tmp_path / "ft")
    recipe = MergeRecipe.from_yaml(f"""
merge_method: task_arithmetic
base_model: {tiny_llama_tied_dir}
models:
  - model: {ft}
    parameters: {{weight: 0.5}}
out_dtype: bfloat16
""")
    res = run_merge(recipe, tmp_path / "out")
    merged = load(tmp_path / "out")
    assert "lm_head.weight" not in merged
    raw = CheckpointReader.from_folder(tmp_path / "out")
    assert raw.dtypes() == ["bfloat16"]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    base, f = load(tiny_llama_tied_dir), load(ft)
    emb = "model.embed_tokens.weight"
    expected = (base[emb] + 0.5 * (f[emb] - base[emb])).to(torch.bfloat16).float()
    assert torch.equal(merged[emb], expected)
    assert res.tensors_changed == res.tensors_total


def test_card_tags_and_public_names(tmp_path, tiny_llama_family):
    f = tiny_llama_family
    run_merge(ties_recipe(f["base"], [f["ft1"], f["ft2"]]), tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert "merge" in front["tags"] and "weightsmith" in front["tags"] and "lines" not in front["tags"]
    assert f["ft1"].name in card and str(f["ft1"]) not in card


def test_passthrough_slices_stack_layers(tmp_path, tiny_llama_family):
    f = tiny_llama_family
    recipe = MergeRecipe.from_yaml(f"""
merge_method: passthrough
slices:
  - sources:
      - model: {f['ft1']}
        layer_range: [0, 3]
  - sources:
      - model: {f['ft2']}
        layer_range: [1, 4]
""")
    res = run_merge(recipe, tmp_path / "out")
    merged, a, b = load(tmp_path / "out"), load(f["ft1"]), load(f["ft2"])
    assert res.num_blocks == 6
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 6
    assert torch.equal(merged["model.layers.2.mlp.up_proj.weight"], a["model.layers.2.mlp.up_proj.weight"])
    assert torch.equal(merged["model.layers.3.mlp.up_proj.weight"], b["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(merged["model.layers.5.mlp.up_proj.weight"], b["model.layers.3.mlp.up_proj.weight"])
    assert torch.equal(merged["model.embed_tokens.weight"], a["model.embed_tokens.weight"])
    assert torch.equal(merged["model.norm.weight"], b["model.norm.weight"])
    assert not torch.equal(a["model.layers.1.mlp.up_proj.weight"], b["model.layers.1.mlp.up_proj.weight"])


def test_cancel_leaves_no_output(tmp_path, tiny_llama_family):
    f = tiny_llama_family
    cancel = threading.Event()

    def progress(done, total, name):
        if done == 5:
            cancel.set()

    with pytest.raises(MergeCancelled):
        run_merge(ties_recipe(f["base"], [f["ft1"]]), tmp_path / "out", progress=progress, cancel=cancel)
    assert list(tmp_path.iterdir()) == []


def test_merge_reports_and_cancels_through_a_job(tmp_path, tiny_llama_family):
    """run_merge reports one named step per tensor through the one job protocol; a cancelled job
    raises Cancelled (MergeCancelled is the same class) and writes nothing; the older keywords still work."""
    from checkpoints.jobs import Cancelled, Job

    f = tiny_llama_family
    job = Job.recording()
    res = run_merge(ties_recipe(f["base"], [f["ft1"]]), tmp_path / "out", job=job)
    names = CheckpointReader.from_folder(f["base"]).keys()
    assert job.events[0] == (0.0, "checking models")
    assert [text for _, text in job.events[1:]] == names and len(names) == res.tensors_total > 30
    assert [fr for fr, _ in job.events[1:]] == [(i + 1) / len(names) for i in range(len(names))]
    assert MergeCancelled is Cancelled
    stop = Job(listener=lambda fraction, text: stop.cancel() if fraction >= 0.25 else None)
    with pytest.raises(MergeCancelled, match="the merge was cancelled; nothing was written"):
        run_merge(ties_recipe(f["base"], [f["ft1"]]), tmp_path / "cancelled", job=stop)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    calls = []
    run_merge(ties_recipe(f["base"], [f["ft1"]]), tmp_path / "old", progress=lambda d, n, name: calls.append((d, n, name)))
    assert calls == [(i + 1, len(names), name) for i, name in enumerate(names)]  # the older callback, exactly
    with pytest.raises(ValueError, match="not both"):
        run_merge(ties_recipe(f["base"], [f["ft1"]]), tmp_path / "both", job=Job(), progress=lambda *a: None)


def test_existing_output_needs_overwrite(tmp_path, tiny_llama_family):
    f = tiny_llama_family
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(WeightsmithError, match="already exists"):
        run_merge(ties_recipe(f["base"], [f["ft1"]]), tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").exists()
    run_merge(ties_recipe(f["base"], [f["ft1"]]), tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "model.safetensors").exists() and not (tmp_path / "out" / "keep.txt").exists()


def test_cli_merge(tmp_path, tiny_llama_family, capsys):
    from cli import main

    f = tiny_llama_family
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(ties_recipe(f["base"], [f["ft1"], f["ft2"]]).to_yaml())
    assert main(["merge", str(recipe), str(tmp_path / "out"), "--max-shard-size", "40KB"]) == 0
    assert len(list((tmp_path / "out").glob("model-*.safetensors"))) > 1
    assert "wrote" in capsys.readouterr().out
    bad = tmp_path / "bad.yml"
    bad.write_text("merge_method: nope\nmodels:\n  - model: a/b\n")
    assert main(["merge", str(bad), str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err
    assert "unknown merge method 'nope'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out2").exists()


@pytest.mark.slow
def test_demo_merge_card_has_hub_base_model(tmp_path, demo_dir):
    """With a Hub-named model the card carries base_model and base_model_relation: merge."""
    recipe = MergeRecipe.from_yaml(f"""
merge_method: task_arithmetic
base_model: demo
models:
  - model: {demo_dir}
    parameters: {{weight: 1.0}}
""")
    res = run_merge(recipe, tmp_path / "out")
    assert res.tensors_changed == 0  # a model minus itself is no task vector
    front = yaml.safe_load((tmp_path / "out" / "README.md").read_text().split("---")[1])
    assert front["base_model"] == ["HuggingFaceTB/SmolLM2-135M-Instruct"]
    assert front["base_model_relation"] == "merge"
    assert "lm_head.weight" not in load(tmp_path / "out")


def test_check_recipe_reads_headers_only(tiny_llama_family, monkeypatch):
    """Check reads each weight file's header and not one byte of tensor data.

    Every read of a ``.safetensors`` file (through ``open``, ``io.open`` or ``Path.open``) is
    counted per file, and memory maps are refused; the count is shown to see a tensor read.
    """
    import builtins
    import io
    import mmap

    from checkpoints.safetensors_header import read_safetensors_file
    from checkpoints.sources import resolve
    from file_proxy import FileProxy
    from merging.engine import check_recipe

    f = tiny_llama_family
    files = sorted(str(p.resolve()) for m in ("base", "ft1", "ft2") for p in f[m].glob("*.safetensors"))
    header_bytes = {p: read_safetensors_file(Path(p)).data_base for p in files}  # 8 + header length
    read: dict[str, int] = {}
    real_open = io.open

    class Counted(FileProxy):
        def __init__(self, f, key: str) -> None:
            super().__init__(f)
            self.key = key

        def read(self, *args):
            data = self.f.read(*args)
            read[self.key] += len(data)
            return data

        def readinto(self, buffer):
            n = self.f.readinto(buffer)
            read[self.key] += n or 0
            return n

    def counting_open(file, *args, **kw):
        handle = real_open(file, *args, **kw)
        if isinstance(file, (str, Path)) and str(file).endswith(".safetensors"):
            key = str(Path(file).resolve())
            read.setdefault(key, 0)
            return Counted(handle, key)
        return handle

    def no_map(*args, **kw):
        raise AssertionError("a tensor was memory-mapped")

    monkeypatch.setattr(builtins, "open", counting_open)
    monkeypatch.setattr(io, "open", counting_open)
    monkeypatch.setattr(mmap, "mmap", no_map)
    summary = check_recipe(ties_recipe(f["base"], [f["ft1"], f["ft2"]]))
    assert summary["architecture"] == "llama" and summary["blocks"] == 4 and summary["tensors"] > 30
    assert sorted(read) == files  # every input's header was read (and nothing was cached from elsewhere) ...
    assert read == header_bytes  # ... and exactly its header: 8 + header length bytes, no data
    # Non-vacuity: loading one tensor through the reader shows up as bytes past the header.
    reader = resolve(f["base"]).reader()
    reader.get(reader.keys()[0])
    base_file = str(reader.meta(reader.keys()[0]).file.resolve())
    assert read[base_file] > 2 * header_bytes[base_file]


def _write_safetensors(path: Path, tensors: list[tuple[str, torch.Tensor]]) -> None:
    """A safetensors file with tensors packed in the given order (no alignment padding between them)."""
    import struct

    names = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
    header, blobs, offset = {}, [], 0
    for name, t in tensors:
        raw = t.contiguous().view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + b"".join(blobs))


def test_loader_mapped_views_unaligned_and_rounded(tmp_path, tiny_llama_family):
    """Inputs read as mapped views, by plain reads when a tensor's bytes are not aligned, and
    rounded through the recipe dtype all give the stored values; writing to a mapped view
    never reaches the file."""
    import shutil

    from checkpoints.sources import resolve
    from checkpoints.tensor_loading import TensorLoader

    name = "model.layers.0.mlp.down_proj.weight"
    want = CheckpointReader.from_folder(tiny_llama_family["ft1"]).get(name)
    folder = tmp_path / "packed"
    folder.mkdir()
    shutil.copy2(tiny_llama_family["ft1"] / "config.json", folder / "config.json")
    odd = torch.arange(3, dtype=torch.bfloat16)  # 6 bytes: the float32 tensors after it sit 2 bytes off
    _write_safetensors(folder / "model.safetensors",
                       [("aligned", want), ("odd", odd), (name, want), ("half", want.to(torch.bfloat16))])
    before = (folder / "model.safetensors").read_bytes()
    ck = resolve(str(folder))
    metas = ck.reader().metas()  # the loader reads at the extents the header check validated
    assert metas["aligned"].data_start % 4 == 0  # mapped
    assert metas[name].data_start % 4 == 2  # read: a float32 view there is not allowed
    for mapped in (False, True):
        loader = TensorLoader(capacity=want.numel(), mapped=mapped)
        for stored in ("aligned", name):
            got = loader.get(ck.reader(), stored, None)
            assert torch.equal(got, want), (mapped, stored)
            got.add_(1.0)  # the method owns its inputs: this must not reach the file
            rounded = loader.get(ck.reader(), stored, torch.bfloat16)
            assert torch.equal(rounded, want.to(torch.bfloat16).float()) and not torch.equal(rounded, want)
        assert torch.equal(loader.get(ck.reader(), "half", None), want.to(torch.bfloat16).float())
    assert (folder / "model.safetensors").read_bytes() == before


def test_passthrough_slices_of_qwen2_keep_a_loadable_config(tmp_path):
    # Qwen2's config lists one attention type per layer; a 6-layer output of two 4-layer models must list 6
    # (transformers refuses the config otherwise; mergekit 0.1.5 itself writes the stale list of 4).
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_attention_heads=4,
                      num_key_value_heads=2, num_hidden_layers=4, max_position_embeddings=64)
    src = tmp_path / "qwen"
    Qwen2ForCausalLM(cfg).save_pretrained(src)
    assert json.loads((src / "config.json").read_text())["layer_types"] == ["full_attention"] * 4  # non-vacuous
    recipe = MergeRecipe.from_yaml(f"""
merge_method: passthrough
slices:
  - sources:
      - model: {src}
        layer_range: [0, 3]
  - sources:
      - model: {src}
        layer_range: [1, 4]
""")
    run_merge(recipe, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_hidden_layers"] == 6 and config["layer_types"] == ["full_attention"] * 6
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.num_hidden_layers == 6
