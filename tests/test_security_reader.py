"""The safetensors header and index/config readers against hostile files (issue 11).

Every malformed file gives one WeightsmithError line naming the file, never a
traceback; the property tests fuzz both parsers with hypothesis and cross-check
every header the reader accepts against safetensors' own loader.
"""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from checkpoints.errors import WeightsmithError
from checkpoints.sources import resolve
from checkpoints.tensors import INDEX_NAME, read_safetensors_header, weight_files


def raw_file(header: object, data: bytes = b"", *, header_bytes: bytes | None = None) -> bytes:
    """A safetensors file with exactly this header (JSON-encoded unless ``header_bytes``) and data."""
    blob = header_bytes if header_bytes is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + data


def f32(shape, begin, end):
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, end]}


def refused(path: Path, match: str) -> str:
    with pytest.raises(WeightsmithError, match=match) as e:
        read_safetensors_header(path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(path.name) and str(path.parent) not in msg
    return msg


# ---------------------------------------------------------------------------
# Impossible extents and wrong entry types (each accepted or crashing before the fix)
# ---------------------------------------------------------------------------

EXTENTS = {
    # tensor byte ranges that do not tile the data section exactly
    "overlapping": ({"a": f32([4], 0, 16), "b": f32([4], 0, 16)}, 16, "overlap"),
    "reversed": ({"a": f32([0], 16, 0), "b": f32([4], 0, 16)}, 16, "claims shape"),
    "gap": ({"a": f32([2], 0, 8), "b": f32([2], 12, 20)}, 20, "belong to no tensor"),
    "trailing bytes": ({"a": f32([2], 0, 8)}, 16, "after the last tensor"),
    "out of file": ({"a": f32([4], 0, 16)}, 8, "truncated"),
    "negative offset": ({"a": f32([4], -16, 0)}, 16, "corrupt safetensors header entry"),
    "negative dims": ({"a": f32([-1, -4], 0, 16)}, 16, "corrupt safetensors header entry"),
    "string dims": ({"a": f32(["4"], 0, 16)}, 16, "corrupt safetensors header entry"),
    "float dims": ({"a": f32([4.5], 0, 16)}, 16, "corrupt safetensors header entry"),
    "bool dims": ({"a": f32([True, 4], 0, 16)}, 16, "corrupt safetensors header entry"),
    "three offsets": ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8, 16]}}, 16, "entry"),
    "unknown dtype": ({"a": {"dtype": "F128", "shape": [4], "data_offsets": [0, 16]}}, 16, "entry"),
    "entry is a list": ({"a": [1, 2]}, 0, "entry"),
    "dtype/size mismatch": ({"a": {"dtype": "F16", "shape": [4], "data_offsets": [0, 16]}}, 16, "claims shape"),
    "metadata not strings": ({"__metadata__": {"format": 1}, "a": f32([1], 0, 4)}, 4, "__metadata__"),
}


@pytest.mark.parametrize("case", sorted(EXTENTS))
def test_impossible_headers_are_one_line(tmp_path, case):
    header, data_len, match = EXTENTS[case]
    f = tmp_path / "evil.safetensors"
    f.write_bytes(raw_file(header, bytes(data_len)))
    refused(f, match)


def test_valid_header_has_checked_extents(tmp_path):
    """Non-vacuity: a real file passes, and the extents the engine reads at are where safetensors puts them."""
    f = tmp_path / "ok.safetensors"
    tensors = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(5, dtype=torch.bfloat16),
               "empty": torch.zeros(0, 3)}
    save_file(tensors, str(f))
    metas = read_safetensors_header(f)
    raw = f.read_bytes()
    for name, t in tensors.items():
        m = metas[name]
        assert m.shape == tuple(t.shape) and m.nbytes == t.numel() * t.element_size()
        got = torch.frombuffer(bytearray(raw[m.data_start:m.data_start + m.nbytes]), dtype=t.dtype) if m.nbytes else t
        assert torch.equal(got.reshape(t.shape), t)


@pytest.mark.parametrize("blob, match", [
    (b"[" * 100_000 + b"]" * 100_000, "start with"),  # deep nesting: RecursionError before the fix
    (b"{" + b'"a":' * 50_000 + b"1" + b"}" * 50_000, "corrupt JSON"),
    (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {"dtype": "F32", "shape": [1], '
     b'"data_offsets": [0, 4]}}', "twice"),
    (b'{"a": \xff}', "corrupt JSON"),
    (b"{}  ", None),
])
def test_header_json_edge_cases(tmp_path, blob, match):
    f = tmp_path / "j.safetensors"
    f.write_bytes(raw_file(None, b"\0" * 4 if b'"a"' in blob else b"", header_bytes=blob))
    if match is None:
        assert read_safetensors_header(f) == {}  # an empty header with no data is a valid file
    else:
        refused(f, match)


def test_absurd_header_length_leaks_nothing_else(tmp_path):
    f = tmp_path / "big.safetensors"
    f.write_bytes(struct.pack("<Q", 2**63) + b"{}")
    refused(f, "corrupt safetensors header: it claims")


def test_engine_reads_only_validated_extents(tmp_path, tiny_llama_family):
    """Before the fix the engine re-parsed headers itself; overlapping extents merged silently."""
    from merging.engine import run_merge
    from merging.recipe import MergeRecipe

    folder = tmp_path / "ft"
    shutil.copytree(tiny_llama_family["ft1"], folder)
    st_file = folder / "model.safetensors"
    raw = st_file.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    names = sorted((k for k in header if k != "__metadata__" and header[k]["shape"] == [32]),
                   key=lambda k: header[k]["data_offsets"][0])
    a, b = names[:2]
    header[b]["data_offsets"] = list(header[a]["data_offsets"])  # b now aliases a's bytes
    st_file.write_bytes(raw_file(header, raw[8 + n:]))
    recipe = MergeRecipe.from_yaml(
        f"merge_method: task_arithmetic\nbase_model: {tiny_llama_family['base']}\n"
        f"models:\n  - model: {folder}\n    parameters: {{weight: 1.0}}\n")
    with pytest.raises(WeightsmithError, match="overlap|belong to no tensor"):
        run_merge(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


# ---------------------------------------------------------------------------
# Index and config JSON of the wrong type
# ---------------------------------------------------------------------------

def _model(tmp_path, src) -> Path:
    folder = tmp_path / "m"
    shutil.copytree(src, folder)
    return folder


@pytest.mark.parametrize("index, match", [
    ("[1, 2]", "expected a JSON object, got list"),
    ("7", "expected a JSON object, got int"),
    ('{"weight_map": ["model.safetensors"]}', "weight_map must map"),
    ('{"weight_map": {}}', "weight_map must map"),
    ('{"weight_map": {"lm_head.weight": 5}}', "maps to int"),
    ('{"weight_map": {"lm_head.weight": null}}', "maps to NoneType"),
    ('{"weight_map": {"lm_head.weight": "config.json"}}', "not a .safetensors file"),
    ('{"weight_map": {"lm_head.weight": "model.safetensors"}, "weight_map": {}}', "twice"),
    (b'{"weight_map": {"x": "mod\xe9l.safetensors"}}', "corrupt JSON"),
    ('{"weight_map": {"x": "%s.safetensors"}}' % ("a" * 300), "cannot be used .File name too long"),
])
def test_index_of_the_wrong_type(tmp_path, tiny_llama_dir, index, match):
    folder = _model(tmp_path, tiny_llama_dir)
    p = folder / INDEX_NAME
    p.write_bytes(index if isinstance(index, bytes) else index.encode())
    with pytest.raises(WeightsmithError, match=match) as e:
        resolve(folder)
    assert "\n" not in str(e.value) and str(tmp_path) not in str(e.value)


@pytest.mark.parametrize("config, match", [
    ("[1, 2]", "expected a JSON object, got list"),
    ("42", "expected a JSON object, got int"),
    ('"model_type"', "expected a JSON object, got str"),
    ('{"model_type": 3}', "has no model_type"),
    (b'{"model_type": "llama\xff"}', "corrupt JSON"),
    ("{nope", "corrupt JSON"),
])
def test_config_of_the_wrong_type(tmp_path, tiny_llama_dir, config, match):
    folder = _model(tmp_path, tiny_llama_dir)
    (folder / "config.json").write_bytes(config if isinstance(config, bytes) else config.encode())
    with pytest.raises(WeightsmithError, match=match) as e:
        resolve(folder)
    # one line, naming the model and the file, not the server folder it sits in
    assert "\n" not in str(e.value) and "config.json" in str(e.value) and str(tmp_path) not in str(e.value)


def test_embedding_of_the_wrong_rank(tmp_path, tiny_llama_dir):
    folder = _model(tmp_path, tiny_llama_dir)
    ck = resolve(folder)
    state = {k: ck.reader().get(k) for k in ck.reader().keys()}
    state["model.embed_tokens.weight"] = torch.tensor(1.0)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(WeightsmithError, match="not a 2-D embedding matrix"):
        resolve(folder).check_matches_config()


# ---------------------------------------------------------------------------
# Property-based fuzzing (bounded: a few seconds in all)
# ---------------------------------------------------------------------------

_DTYPES = ["F32", "F16", "BF16", "I64", "U8", "BOOL"]
# Wrong-typed values, cheap to draw (recursive JSON strategies are slow on this machine).
_junk = st.sampled_from([None, True, 1.5, float("nan"), -1, 2**70, "4", "", [], {}, [1, "x"], [[4]], {"a": 1}])
_json = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.text(max_size=4)),
                     lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=4), kids, max_size=3),
                     max_leaves=6)
_count = st.integers(-3, 40)


@st.composite
def _headers(draw):
    """Mostly plausible headers (random dtypes, shapes, offsets), sometimes wrong types anywhere."""
    header: dict[str, object] = {}
    for i in range(draw(st.integers(0, 4))):
        entry = {"dtype": draw(st.sampled_from([*_DTYPES, "F8", "x"]) | _junk),
                 "shape": draw(st.lists(_count, max_size=3) | _junk),
                 "data_offsets": draw(st.lists(_count.map(lambda x: x * 4), min_size=2, max_size=2) | _junk)}
        header[draw(st.sampled_from(["a", "b", "c", "__metadata__", f"t{i}"]))] = (
            draw(_junk) if draw(st.integers(0, 5)) == 0 else entry)
    return (draw(_junk) if draw(st.integers(0, 9)) == 0 else header), draw(st.integers(0, 96))


_SIZES = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "U8": 1, "BOOL": 1}


@st.composite
def _tiled(draw):
    """Headers whose extents tile the data (valid files), then maybe one small lie."""
    header: dict[str, object] = {}
    at = 0
    for name in draw(st.lists(st.sampled_from("abcdef"), unique=True, max_size=4)):
        dtype = draw(st.sampled_from(_DTYPES))
        shape = draw(st.lists(st.integers(0, 3), max_size=3))
        n = _SIZES[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [at, at + n]}
        at += n
    data_len = at
    lie = draw(st.integers(0, 5))
    if header and lie == 1:  # move one offset
        entry = header[draw(st.sampled_from(sorted(header)))]
        entry["data_offsets"][draw(st.integers(0, 1))] += draw(st.sampled_from([-4, -1, 1, 4, 2**40]))
    elif header and lie == 2:  # change one dimension
        entry = header[draw(st.sampled_from(sorted(header)))]
        entry["shape"] = [*entry["shape"], draw(st.integers(-2, 2))]
    elif lie == 3:
        data_len += draw(st.sampled_from([-1, 1, 8]))
    return header, max(data_len, 0)


def _check_accepted(path: Path, metas) -> None:
    """What the reader accepts, safetensors loads, with the shapes and dtypes the reader reported."""
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == set(metas)
        for name, m in metas.items():
            t = f.get_tensor(name)
            assert tuple(t.shape) == m.shape and t.dtype == m.dtype


def _read_or_refuse(path: Path) -> None:
    try:
        metas = read_safetensors_header(path)
    except WeightsmithError as e:
        assert "\n" not in str(e) and str(e).startswith(path.name)
        return
    _check_accepted(path, metas)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=st.one_of(_headers(), _tiled()))
def test_fuzz_header_loads_or_one_error(case):
    header, data_len = case
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "fuzz.safetensors"
        path.write_bytes(raw_file(header, bytes(data_len)))
        _read_or_refuse(path)


_VALID = None


def _valid_file() -> bytes:
    global _VALID
    if _VALID is None:
        with tempfile.TemporaryDirectory() as d:
            save_file({"a": torch.arange(4.0), "b": torch.ones(2, 3, dtype=torch.float16),
                       "c": torch.tensor([1, 2], dtype=torch.int64)}, str(Path(d) / "v.safetensors"))
            _VALID = (Path(d) / "v.safetensors").read_bytes()
    return _VALID


@settings(max_examples=150, deadline=None)
@given(edits=st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), min_size=1, max_size=6),
       cut=st.integers(0, 400))
def test_fuzz_mutated_real_file(edits, cut):
    """Byte flips in (and truncations of) a real file: a correct load or one error."""
    raw = bytearray(_valid_file())
    for at, value in edits:
        raw[at % len(raw)] = value
    if cut % 5 == 0:
        raw = raw[: cut % len(raw)]
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.safetensors"
        path.write_bytes(bytes(raw))
        _read_or_refuse(path)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(index=st.one_of(_json, st.fixed_dictionaries({"weight_map": _json}),
                       st.fixed_dictionaries({"weight_map": st.dictionaries(
                           st.text(max_size=8), st.one_of(_junk, st.sampled_from(
                               ["model.safetensors", "../model.safetensors", "/etc/passwd", "sub/../model.safetensors",
                                "./model.safetensors", "missing.safetensors", "model.safetensors\x00",
                                "x" * 300 + ".safetensors"])), max_size=3)})))
def test_fuzz_index_inside_or_one_error(index):
    """Any index JSON either names files inside the folder or gives one error naming the index."""
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        folder = root / "model"
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(_valid_file())
        (root / "model.safetensors").write_bytes(_valid_file())  # what "../" would reach
        (folder / INDEX_NAME).write_text(json.dumps(index))
        try:
            files = weight_files(folder)
        except WeightsmithError as e:
            assert "\n" not in str(e) and d not in str(e)
            return
        assert files and all(f.resolve().is_relative_to(folder.resolve()) for f in files)
