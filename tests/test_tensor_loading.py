"""One tensor I/O story: the reader keeps each header's extents, and every read goes through them.

Files here are written byte by byte (8-byte length, JSON header, data), so the
offsets the reader reports can be checked against offsets we chose.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from checkpoints.errors import WeightsmithError
from checkpoints.tensor_loading import Prefetcher, TensorLoader, map_tensor, read_tensor
from checkpoints.tensors import CheckpointReader


def raw_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def hand_written(path: Path, entries: list[tuple[str, str, list[int], bytes]], metadata=None,
                 header_pad: int = 0) -> tuple[int, list[tuple[int, int]]]:
    """Write a safetensors file whose tensors follow each other in ``entries`` order;
    returns (length of the header JSON, the data offsets written)."""
    header: dict[str, object] = {}
    offsets, at = [], 0
    for name, dtype, shape, data in entries:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [at, at + len(data)]}
        offsets.append((at, at + len(data)))
        at += len(data)
    if metadata is not None:
        header["__metadata__"] = metadata
    blob = json.dumps(header).encode() + b" " * header_pad
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + b"".join(e[3] for e in entries))
    return len(blob), offsets


@pytest.fixture
def packed(tmp_path):
    """Four tensors of four dtypes packed without alignment: float32, bfloat16 (6 bytes), int64, float32."""
    a = torch.tensor([1.5, -2.25, 3.0, 4.125])
    b = torch.tensor([0.5, 7.0, -1.0], dtype=torch.bfloat16)
    c = torch.tensor([2**40 + 3, -5], dtype=torch.int64)
    d = torch.arange(6, dtype=torch.float32).reshape(2, 3) / 7
    path = tmp_path / "hand.safetensors"
    n, offsets = hand_written(path, [("a", "F32", [4], raw_bytes(a)), ("b", "BF16", [3], raw_bytes(b)),
                                     ("c", "I64", [2], raw_bytes(c)), ("d", "F32", [2, 3], raw_bytes(d))],
                              metadata={"format": "pt", "made": "by hand"})
    return path, n, offsets, {"a": a, "b": b, "c": c, "d": d}


def test_reader_keeps_offsets_per_tensor_and_per_file(packed):
    path, n, offsets, want = packed
    reader = CheckpointReader.from_files([path])
    (header,) = reader.headers()
    assert header.file == path and header.data_base == 8 + n and header.file_size == path.stat().st_size
    assert header.metadata == {"format": "pt", "made": "by hand"}
    assert offsets == [(0, 16), (16, 22), (22, 38), (38, 62)]
    for (name, t), (begin, end) in zip(want.items(), offsets):
        m = reader.meta(name)
        assert header.tensors[name] is m
        assert (m.dtype, m.shape, m.data_offsets) == (t.dtype, tuple(t.shape), (begin, end))
        assert m.data_start == 8 + n + begin and m.nbytes == end - begin
        assert path.read_bytes()[m.data_start:m.data_start + m.nbytes] == raw_bytes(t)
        got = reader.get(name, dtype=None)
        assert got.dtype == t.dtype and torch.equal(got, t)
        with safe_open(str(path), framework="pt") as f:  # the library agrees with our extents
            assert torch.equal(f.get_tensor(name), got)
    assert not torch.equal(reader.get("a"), reader.get("d").reshape(-1)[:4])  # distinct data, not one blob
    assert reader.get("b").dtype == torch.float32  # get() converts floats by default, keeps integers
    assert reader.get("c").dtype == torch.int64


def test_loader_reads_unaligned_extents_through_the_reader(packed):
    path, _, _, want = packed
    reader = CheckpointReader.from_files([path])
    assert reader.meta("d").data_start % 4 == 2  # float32 bytes two off alignment: read, not mapped
    assert map_tensor(reader.meta("d")) is None and map_tensor(reader.meta("a")) is not None
    for mapped in (False, True):
        loader = TensorLoader(capacity=6, mapped=mapped)
        assert torch.equal(loader.get(reader, "d", None), want["d"])
        assert torch.equal(loader.get(reader, "a", None), want["a"])
        assert torch.equal(loader.get(reader, "b", None), want["b"].float())
        assert torch.equal(loader.get(reader, "c", None), want["c"])  # integers come back as stored
        rounded = loader.get(reader, "d", torch.bfloat16)
        assert torch.equal(rounded, want["d"].to(torch.bfloat16).float()) and not torch.equal(rounded, want["d"])


def test_a_file_changed_after_its_header_was_read_is_one_error(packed):
    """Reads go through the checked extents; a file truncated since is refused, never read past its end
    (a mapped page past the end of a file would be a SIGBUS, not an error)."""
    path, _, _, want = packed
    reader = CheckpointReader.from_files([path])
    assert torch.equal(reader.get("d"), want["d"])  # readable before
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 8)
    loaders = [TensorLoader(capacity=6), TensorLoader(capacity=6, mapped=True)]
    for read in (lambda: reader.get("d"), lambda: reader.get("a"), *(lambda lo=lo: lo.get(reader, "a", None)
                                                                      for lo in loaders)):
        with pytest.raises(WeightsmithError, match="hand.safetensors: the file changed since its header was read") as e:
            read()
        assert "\n" not in str(e.value) and str(path.parent) not in str(e.value)


def test_an_unchecked_extent_past_the_file_is_refused(packed):
    """A TensorMeta that did not come from the header check cannot make the loader read past the file."""
    path, _, _, want = packed
    checked = CheckpointReader.from_files([path]).meta("a")
    end = path.stat().st_size - checked.data_base
    rogue = dataclasses.replace(checked, data_offsets=(end, end + 16))
    with pytest.raises(WeightsmithError, match="changed since its header was read"):
        read_tensor(rogue)
    for loader in (TensorLoader(), TensorLoader(capacity=4, mapped=True)):
        with pytest.raises(WeightsmithError, match="changed since its header was read"):
            loader.get(CheckpointReader({"a": rogue}), "a", None)
    aligned = dataclasses.replace(checked, data_offsets=(end + 2, end + 18))  # a float32 boundary: mapped path
    assert aligned.data_start % 4 == 0
    with pytest.raises(WeightsmithError, match="changed since its header was read"):
        map_tensor(aligned)
    assert torch.equal(read_tensor(checked), want["a"])  # the checked extent of the same file reads


@pytest.mark.parametrize("entries,match", [
    ([("a", "F32", [4], b"\0" * 16), ("b", "F32", [4], None)], "overlap"),  # b given a's extent
    ([("a", "F32", [5], b"\0" * 16)], "claims shape"),
    ([("a", "F32", [4], b"\0" * 8)], "claims shape"),
])
def test_hostile_headers_never_reach_the_loader(tmp_path, entries, match):
    path = tmp_path / "bad.safetensors"
    header, data = {}, b""
    for name, dtype, shape, payload in entries:
        if payload is None:
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": header["a"]["data_offsets"]}
            continue
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(payload)]}
        data += payload
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    with pytest.raises(WeightsmithError, match=match):
        CheckpointReader.from_files([path])


def test_past_the_end_offsets_are_refused_before_any_read(tmp_path):
    path = tmp_path / "short.safetensors"
    blob = json.dumps({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + b"\0" * 8)
    with pytest.raises(WeightsmithError, match="short.safetensors: truncated: tensor 'a' needs bytes up to 16"):
        CheckpointReader.from_files([path])


def test_a_shard_outside_the_folder_never_reaches_the_loader(tmp_path, packed):
    path, _, _, _ = packed
    folder = tmp_path / "ckpt"
    folder.mkdir()
    os.symlink(path, folder / "model-00001-of-00001.safetensors")  # points out of the checkpoint
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00001.safetensors"}}))
    with pytest.raises(WeightsmithError, match="points outside the checkpoint folder"):
        CheckpointReader.from_folder(folder)


def test_prefetcher_reads_ahead_into_the_other_loader_within_capacity():
    sizes = [2, 2, 5, 1, 1, 1]
    reads: list[tuple[int, int, str]] = []

    def read(i: int, loader: TensorLoader) -> int:
        reads.append((i, id(loader), threading.current_thread().name))
        return i * 10

    with Prefetcher(sizes, read, capacity=5, skip=lambda i: i == 4) as pre:
        got = []
        for i in range(len(sizes)):
            if i == 4:
                continue
            value, loader = pre.take(i)
            pre.start_after(i)
            got.append((value, id(loader)))
    assert [v for v, _ in got] == [0, 10, 20, 30, 50]
    main = threading.current_thread().name
    by_step = {i: (lid, thread) for i, lid, thread in reads}
    assert sorted(by_step) == [0, 1, 2, 3, 5]  # step 4 is skipped: never read
    assert by_step[0][1] == main  # nothing to read ahead of the first
    assert by_step[1][1].startswith("tensor-read")  # 2 + 2 <= 5: read ahead on the thread
    assert by_step[2][1] == main and by_step[3][1] == main  # 2 + 5 and 5 + 1 > 5: each read in its turn
    assert by_step[5][1].startswith("tensor-read")  # 1 + 1: read ahead, past the skipped step
    assert by_step[0][0] != by_step[1][0]  # a read-ahead never fills the loader still in use


_REUSE_PROBE = """
import resource, sys
sys.path.insert(0, {root!r})
if {keep}:
    from checkpoints.tensor_loading import keep_freed_buffers
    assert keep_freed_buffers()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
block = bytearray(64 << 20)  # malloc'd and zero-filled: every page touched
del block
before = faults()
block = bytearray(64 << 20)
print(faults() - before)
"""


@pytest.mark.skipif(not os.path.exists("/lib/x86_64-linux-gnu/libc.so.6") and not os.path.exists("/lib64/libc.so.6"),
                    reason="glibc only")
def test_keep_freed_buffers_reuses_a_large_freed_block():
    """After keep_freed_buffers a freed 64 MB block is reused (a few page faults); by default glibc
    unmaps it and the next one faults in all 16384 pages again."""
    import subprocess
    import sys

    root = str(Path(__file__).resolve().parents[1])

    def page_faults(keep: bool) -> int:
        out = subprocess.run([sys.executable, "-c", _REUSE_PROBE.format(root=root, keep=keep)],
                             capture_output=True, text=True, check=True)
        return int(out.stdout.strip())

    assert page_faults(True) < 1000
    assert page_faults(False) > 10_000  # non-vacuous: without it the block is fresh memory again
