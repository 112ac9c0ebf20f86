"""Tensor I/O: lazy reading, sharded atomic writing, tied weights, bad input."""

from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from checkpoints.errors import WeightsmithError
from checkpoints.sources import resolve
from checkpoints.tensors import (
    INDEX_NAME,
    CheckpointReader,
    ShardedWriter,
    read_safetensors_header,
)


def _state(ckpt):
    return {k: ckpt.reader().get(k, dtype=None) for k in ckpt.reader().keys()}


@pytest.mark.parametrize("header_reserve", [0, 1 << 16])
def test_fsync_only_when_asked_and_same_bytes(tiny_llama_dir, tmp_path, monkeypatch, header_reserve):
    src = resolve(tiny_llama_dir)
    synced: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    outs = {}
    for durable in (False, True):
        out = outs[durable] = tmp_path / f"fsync-{durable}"
        with ShardedWriter(out, max_shard_bytes=20_000, fsync=durable, header_reserve=header_reserve) as w:
            for name in src.reader().keys():
                w.add(name, src.reader().get(name, dtype=None))
        shards = sorted(out.glob("model-*.safetensors"))
        assert len(synced) == (len(shards) if durable else 0)  # one fsync per shard, none by default
    a, b = (sorted(outs[d].iterdir()) for d in (False, True))
    assert [x.name for x in a] == [y.name for y in b] and len(a) > 2
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b))


def test_sharded_round_trip_is_identical(tiny_llama_dir, tmp_path):
    src = resolve(tiny_llama_dir)
    out = tmp_path / "copy"
    with ShardedWriter(out, max_shard_bytes=20_000) as w:
        for name in src.reader().keys():
            w.add(name, src.reader().get(name, dtype=None))
        w.copy_support_files(src.support_dir)
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 2, "small max shard size must produce several shards"
    index = json.loads((out / INDEX_NAME).read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    copy = resolve(out)
    a, b = _state(src), _state(copy)
    assert a.keys() == b.keys() and len(a) > 10
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the copy loads in transformers and computes the same logits
    ids = torch.tensor([[1, 5, 9, 3]])
    torch.testing.assert_close(src.load_model()(ids).logits, copy.load_model()(ids).logits, rtol=0, atol=0)


def test_dtype_cast_on_write(tiny_llama_dir, tmp_path):
    src = resolve(tiny_llama_dir)
    with ShardedWriter(tmp_path / "bf16", dtype=torch.bfloat16) as w:
        for name in src.reader().keys():
            w.add(name, src.reader().get(name))
    r = CheckpointReader.from_folder(tmp_path / "bf16")
    name = "model.layers.0.mlp.down_proj.weight"
    assert r.meta(name).dtype == torch.bfloat16
    assert torch.equal(r.get(name), src.reader().get(name).to(torch.bfloat16).float())


def test_tied_weights_stay_tied(tiny_llama_tied_dir, tmp_path):
    src = resolve(tiny_llama_tied_dir)
    assert src.spec.tied_head_names(src.config) == ["lm_head.weight"]
    assert "lm_head.weight" not in src.reader()  # save_pretrained drops the tied copy
    out = tmp_path / "tied"
    with ShardedWriter(out, skip=src.tied_names()) as w:
        for name in src.reader().keys():
            w.add(name, src.reader().get(name))
        w.add("lm_head.weight", src.reader().get("model.embed_tokens.weight") * 2)  # skipped: tied
        w.copy_support_files(src.support_dir)
    model = resolve(out).load_model()
    assert "lm_head.weight" not in CheckpointReader.from_folder(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(model.model.embed_tokens.weight, src.reader().get("model.embed_tokens.weight"))


def test_failed_write_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with ShardedWriter(out, max_shard_bytes=100) as w:
            w.add("a", torch.ones(100))
            w.add("b", torch.ones(100))
            raise RuntimeError("boom")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_not_clobbered(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(WeightsmithError, match="already exists"):
        ShardedWriter(tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_reader_is_lazy(tiny_llama_dir, monkeypatch):
    """get() reads one tensor from its file; nothing but the headers is read at construction."""
    import checkpoints.tensors as tensors

    opened: list[str] = []
    real = tensors.read_tensor
    monkeypatch.setattr(tensors, "read_tensor", lambda meta: (opened.append(str(meta.file)), real(meta))[1])
    reader = CheckpointReader.from_folder(tiny_llama_dir)
    assert opened == []
    t = reader.get("model.norm.weight")
    assert t.dtype == torch.float32 and opened == [str(tiny_llama_dir / "model.safetensors")]


# ---------------------------------------------------------------------------
# Bad input: one clear line naming the file and the problem
# ---------------------------------------------------------------------------


def _copy_folder(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_truncated_safetensors(tiny_llama_dir, tmp_path):
    folder = _copy_folder(tiny_llama_dir, tmp_path / "m")
    f = folder / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(WeightsmithError) as e:
        resolve(folder).reader()
    assert "model.safetensors: truncated" in str(e.value) and "\n" not in str(e.value)


def test_absurd_header_size(tmp_path):
    f = tmp_path / "bad.safetensors"
    f.write_bytes(struct.pack("<Q", 2**60) + b"{}")
    with pytest.raises(WeightsmithError, match=r"bad.safetensors: corrupt safetensors header: it claims \d+ header bytes"):
        read_safetensors_header(f)


def test_header_claims_wrong_shape(tmp_path):
    f = tmp_path / "liar.safetensors"
    save_file({"w": torch.zeros(4, 4)}, str(f))
    raw = f.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = raw[8 : 8 + n].replace(b"[4,4]", b"[9,9]")
    f.write_bytes(raw[:8] + header + raw[8 + n :])
    with pytest.raises(WeightsmithError, match=r"liar.safetensors: header of tensor 'w' claims shape \[9, 9\]"):
        read_safetensors_header(f)


def test_missing_shard(tiny_llama_dir, tmp_path):
    src = resolve(tiny_llama_dir)
    out = tmp_path / "sharded"
    with ShardedWriter(out, max_shard_bytes=20_000) as w:
        for name in src.reader().keys():
            w.add(name, src.reader().get(name))
        w.copy_support_files(src.support_dir)
    victim = sorted(out.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(WeightsmithError, match=f"names shard {victim.name} but .* is missing"):
        resolve(out)


def test_config_that_does_not_match_weights(tiny_llama_dir, tmp_path):
    folder = _copy_folder(tiny_llama_dir, tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_hidden_layers"] = 7
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsmithError, match="config says 7 layers but the weights have 4 blocks"):
        resolve(folder).check_matches_config()
    cfg["num_hidden_layers"] = 4
    cfg["vocab_size"] = 100
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsmithError, match="config says vocab_size 100 but model.embed_tokens.weight has 64 rows"):
        resolve(folder).load_model()


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/weightsmith-pwned",))


def test_pickle_with_code_payload_is_refused(tiny_llama_dir, tmp_path):
    evil = tmp_path / "pytorch_model.bin"
    with open(evil, "wb") as f:
        pickle.dump({"w": _Payload()}, f)
    marker = Path("/tmp/weightsmith-pwned")
    marker.unlink(missing_ok=True)
    with pytest.raises(WeightsmithError, match="pytorch_model.bin: refused to load pickle"):
        resolve(evil, config_from=str(tiny_llama_dir)).reader()
    assert not marker.exists()


def test_plain_pickle_state_dict_loads(tiny_llama_dir, tmp_path):
    src = resolve(tiny_llama_dir)
    state = {k: src.reader().get(k) for k in src.reader().keys()}
    torch.save(state, tmp_path / "weights.pt")
    ckpt = resolve(tmp_path / "weights.pt", config_from=str(tiny_llama_dir))
    assert ckpt.kind == "pickle"
    name = "model.layers.1.self_attn.q_proj.weight"
    assert torch.equal(ckpt.reader().get(name), state[name])


def test_single_safetensors_file_takes_config_from_base(tiny_llama_dir, tmp_path):
    src = resolve(tiny_llama_dir)
    f = tmp_path / "finetune.safetensors"
    save_file({k: src.reader().get(k) + 1 for k in src.reader().keys()}, str(f))
    with pytest.raises(WeightsmithError, match="needs a config"):
        resolve(f)
    ckpt = resolve(f, config_from=str(tiny_llama_dir))
    assert ckpt.name == "finetune" and ckpt.model_type == "llama"
    model = ckpt.load_model()
    assert torch.equal(model.model.norm.weight, src.reader().get("model.norm.weight") + 1)


def test_unknown_reference():
    with pytest.raises(WeightsmithError, match="no such file or folder, and not a Hub repo id"):
        resolve("./does/not/exist")


def test_hub_id_offline_without_cache_is_one_clear_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(WeightsmithError) as e:
        resolve("someone/some-model")
    msg = str(e.value)
    assert "someone/some-model: not in the local Hugging Face cache" in msg and "hf download" in msg


def test_add_file_puts_bytes_and_copies_into_the_output_only(tmp_path):
    src = tmp_path / "tokenizer.json"
    src.write_bytes(b'{"v": 1}')
    out = tmp_path / "out"
    with ShardedWriter(out) as w:
        w.add("x", torch.arange(3.0))
        w.add_file("README.md", "héllo\n".encode())
        w.add_file("tokenizer.json", src)
        w.add_file("sub/notes.txt", b"first")
        w.add_file("sub/notes.txt", b"second")  # a later call replaces
        w.write_text("config.json", "{}\n")
        assert not out.exists()  # nothing visible before commit
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "README.md", "config.json", "model.safetensors", "sub/notes.txt", "tokenizer.json"]
    assert (out / "README.md").read_bytes() == "héllo\n".encode()
    assert (out / "tokenizer.json").read_bytes() == b'{"v": 1}' and src.exists()
    assert (out / "sub" / "notes.txt").read_bytes() == b"second"
    assert torch.equal(CheckpointReader.from_folder(out).get("x"), torch.arange(3.0))


@pytest.mark.parametrize("name,match", [
    ("../escape.txt", "leaves the folder"),
    ("/etc/escape.txt", "absolute path"),
    ("model.safetensors", "the writer makes this file itself"),
    (INDEX_NAME, "the writer makes this file itself"),
    ("model-00001-of-00002.safetensors", "the writer makes this file itself"),
])
def test_add_file_refuses_names_outside_or_owned_by_the_writer(tmp_path, name, match):
    with pytest.raises(WeightsmithError, match=match):
        with ShardedWriter(tmp_path / "out") as w:
            w.add("x", torch.zeros(2))
            w.add_file(name, b"payload")
    assert list(tmp_path.iterdir()) == []  # aborted: no output, no staging folder, nothing outside
