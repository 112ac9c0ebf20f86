"""GGUF export: read back without trusting the writer, load in transformers, LoRA adapters, CLI, failures.

Tiny random llama (untied and tied) and gpt2 models get a small byte-level BPE
tokenizer (the shared fixtures' word-level tokenizer has no GGUF form). The
tiny gpt2 has 1024 positions because transformers' GGUF loader maps
``context_length`` to ``n_ctx``, which GPT2Config ignores (it sizes ``wpe`` from
``n_positions``, default 1024). Each model is trained for a few seconds on
the four sentences it is prompted with: a random model's next-token logits are
near ties (a gap of 0.002 where float16 moves logits by 0.007), so greedy text
would depend on rounding, not on the export; a trained one has clear choices.
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from checkpoints.errors import WeightsmithError
from checkpoints.gguf_check import check_gguf, decode, error_bound, llama_rows
from checkpoints.gguf_export import GGUF_TYPES, export_gguf, plan_model
from checkpoints.sources import resolve

TEXT = ["The capital of France is Paris.", "The Eiffel Tower is located in the city of Paris.",
        "Rome is the capital of Italy.", "Berlin is in Germany, Madrid is in Spain."]
PROMPTS = ["The capital of", "The Eiffel Tower is", "Rome is the", "Berlin is in", "Madrid", "The city of Paris"]
CHAT = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"


def bpe_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(TEXT * 4, trainers.BpeTrainer(vocab_size=vocab_size - 3, special_tokens=specials,
                                                          show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=specials[0], bos_token=specials[1],
                                   eos_token=specials[2], pad_token=specials[2])
    fast.chat_template = CHAT
    return fast


def _trained(model, steps: int = 60):
    """``model`` fitted to :data:`TEXT` (seeded, single-threaded: the same weights on every run)."""
    tok = bpe_tokenizer(model.config.vocab_size)
    batch = tok(TEXT, return_tensors="pt", padding=True)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(**batch, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _save(model, folder: Path) -> Path:
    model.save_pretrained(folder, safe_serialization=True)
    bpe_tokenizer(model.config.vocab_size).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    from transformers import GPT2Config, GPT2LMHeadModel

    from conftest import build_tiny_llama

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=3, n_head=4, n_positions=1024,
                                      bos_token_id=1, eos_token_id=2)).eval()
    root = tmp_path_factory.mktemp("gguf-models")
    return {"llama": _save(_trained(build_tiny_llama(0)), root / "llama"),
            "llama_tied": _save(_trained(build_tiny_llama(1, tie=True)), root / "llama_tied"),
            "gpt2": _save(_trained(gpt2), root / "gpt2")}


@pytest.fixture(scope="module")
def exports(models, tmp_path_factory) -> dict[tuple[str, str], Path]:
    """Every model in every type, written once."""
    root = tmp_path_factory.mktemp("gguf-out")
    out = {}
    for m in ("llama", "gpt2"):
        for q in GGUF_TYPES:
            out[m, q] = export_gguf(models[m], root / f"{m}-{q}.gguf", qtype=q).path
    for q in ("f16", "q8_0"):
        out["llama_tied", q] = export_gguf(models["llama_tied"], root / f"tied-{q}.gguf", qtype=q).path
    return out


def _reader(path):
    import gguf

    return gguf.GGUFReader(str(path))


# ---------------------------------------------------------------------------
# read back: presence, shape, type, values within the derived bounds
# ---------------------------------------------------------------------------


def _expected_type(name: str, shape: tuple[int, ...], qtype: str, names: set[str]) -> str:
    """Stated independently of the writer: what llama.cpp's converter (+ llama-quantize for 4/5 bits) writes."""
    base = GGUF_TYPES[qtype][0]
    if len(shape) == 1 or name.endswith("_norm.weight") or name.endswith(".bias") or name == "position_embd.weight":
        return "F32"
    output = "output.weight" if "output.weight" in names else "token_embd.weight"  # tied: the embedding
    if qtype in ("q4_0", "q4_1", "q5_0", "q5_1") and name == output:
        return "Q8_0"
    if base.startswith("Q") and shape[-1] % 32:
        return "F16"
    return base


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("qtype", list(GGUF_TYPES))
def test_every_tensor_present_typed_and_within_bound(models, exports, arch, qtype):
    path = exports[arch, qtype]
    ckpt = resolve(models[arch])
    report = check_gguf(path, ckpt)
    assert report.ok, report.failures
    n_source = len([k for k in ckpt.reader().keys() if not k.endswith(".attn.bias")])
    assert report.tensors == n_source - len(ckpt.tied_names()) * any(k in ckpt.reader().keys()
                                                                       for k in ckpt.tied_names())
    types = {t.name: t.tensor_type.name for t in _reader(path).tensors}
    shapes = {t.name: tuple(int(s) for s in reversed(t.shape)) for t in _reader(path).tensors}
    for name, type_name in types.items():
        assert type_name == _expected_type(name, shapes[name], qtype, set(types)), name
    if qtype != "f32":
        assert report.worst_ratio > 0.5  # the bounds are tight, not vacuous: errors reach them
    r = _reader(path)
    assert r.fields["general.file_type"].contents() == int(__import__("gguf").LlamaFileType[GGUF_TYPES[qtype][1]])
    assert r.fields["general.architecture"].contents() == arch


def test_gpt2_layout_and_no_duplicate_output(exports):
    names = {t.name: t for t in _reader(exports["gpt2", "q8_0"]).tensors}
    assert "output.weight" not in names  # gpt2 ties its head to wte
    assert names["position_embd.weight"].tensor_type.name == "F32"
    # Conv1D c_attn is stored [in=32, out=96]; llama.cpp wants [out, in]: ggml shape (in, out)
    assert [int(s) for s in names["blk.0.attn_qkv.weight"].shape] == [32, 96]


def test_tied_llama_writes_no_output_tensor(models, exports):
    tied = {t.name for t in _reader(exports["llama_tied", "q8_0"]).tensors}
    untied = {t.name for t in _reader(exports["llama", "q8_0"]).tensors}
    assert "output.weight" not in tied and "output.weight" in untied
    assert untied - tied == {"output.weight"}


def test_low_bit_types_keep_the_tied_embedding_at_8_bits(exports):
    types = {t.name: t.tensor_type.name for t in _reader(exports["llama", "q4_0"]).tensors}
    assert types["output.weight"] == "Q8_0" and types["token_embd.weight"] == "Q4_0"
    g = {t.name: t.tensor_type.name for t in _reader(exports["gpt2", "q4_0"]).tensors}
    assert g["token_embd.weight"] == "Q8_0"  # tied: the embedding is the output matrix


def test_decoders_agree_with_gguf_and_bounds_hold_by_hand():
    import gguf

    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 64)).astype(np.float32) * 0.05
    x[0, 0] = 0.5  # a block whose extreme is positive...
    x[0, 1] = -0.49  # ...with a near-extreme of the other sign: Q4_0 clips it to 7 steps
    for name in ("F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"):
        q = gguf.GGMLQuantizationType[name]
        raw = gguf.quants.quantize(x, q)
        mine = decode(raw, name, x.shape)
        np.testing.assert_array_equal(mine, gguf.quants.dequantize(raw, q).reshape(x.shape))
        assert (np.abs(mine - x) <= error_bound(x, name)).all(), name
    # hand case: Q4_0 block of the first row: d = 0.5 / -8; -0.49 / d = 7.84 -> clipped to 15 -> 7 steps
    raw = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q4_0)
    got = decode(raw, "Q4_0", x.shape)[0, 1]
    d = np.float32(np.float16(np.float32(0.5) / -8))
    assert got == pytest.approx(7 * float(d))  # -0.4375: error 0.0525 > half a step (0.03125) ...
    assert abs(got - x[0, 1]) <= 0.5 / 8 + 8 * (0.5 / 8 * 2 ** -11 + 2 ** -25) + 0.5 * 2 ** -20  # ... within amax/8


def test_llama_row_map_is_the_rotary_interleave():
    rows = llama_rows(8, 2)  # 2 heads of 4 rows: pairs (0,2),(1,3) -> adjacent
    assert rows.tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_check_catches_a_corrupted_tensor(models, exports, tmp_path):
    ckpt = resolve(models["llama"])
    for qtype in ("q8_0", "f16"):
        bad = tmp_path / f"bad-{qtype}.gguf"
        shutil.copy(exports["llama", qtype], bad)
        t = next(t for t in _reader(bad).tensors if t.name == "blk.1.attn_q.weight")
        with open(bad, "r+b") as f:  # flip one byte in the middle of the tensor's data
            f.seek(int(t.data_offset) + int(t.n_bytes) // 2 + 1)
            byte = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([byte[0] ^ 0x40]))
        report = check_gguf(bad, ckpt)
        assert not report.ok and all("blk.1.attn_q.weight" in f for f in report.failures), report.failures
    # a 4-bit tensor fails the 8-bit bound: the bound depends on the type, it is not loose
    t = next(t for t in _reader(exports["llama", "q4_0"]).tensors if t.name == "blk.0.ffn_up.weight")
    x = ckpt.reader().get("model.layers.0.mlp.up_proj.weight").numpy()
    got = decode(t.data, "Q4_0", x.shape)
    assert (np.abs(got - x) <= error_bound(x, "Q4_0")).all()
    assert (np.abs(got - x) > error_bound(x, "Q8_0")).any()


def test_check_needs_the_permutation(models, exports):
    """Without llama.cpp's row order the q projection would not match its source: the permute is real."""
    ckpt = resolve(models["llama"])
    t = next(t for t in _reader(exports["llama", "f32"]).tensors if t.name == "blk.0.attn_q.weight")
    got = decode(t.data, "F32", (32, 32))
    src = ckpt.reader().get("model.layers.0.self_attn.q_proj.weight").numpy()
    assert not np.array_equal(got, src)
    np.testing.assert_array_equal(got, src[llama_rows(32, 4)])


def test_streams_tensor_by_tensor(models, tmp_path):
    """At each progress call the partial file already holds the bytes of the tensors written so far."""
    ckpt = resolve(models["llama"])
    plans = plan_model(ckpt, "f32")
    seen = []

    def progress(done: int, total: int, name: str) -> None:
        partial = list(tmp_path.glob(".out.gguf.partial-*/out.gguf"))
        assert len(partial) == 1 and not (tmp_path / "out.gguf").exists()
        seen.append((partial[0].stat().st_size, sum(p.nbytes for p in plans[:done])))

    export_gguf(ckpt, tmp_path / "out.gguf", qtype="f32", progress=progress)
    assert len(seen) == len(plans)
    assert all(size >= written for size, written in seen)
    assert seen[0][0] < seen[-1][1]  # the first tensor's bytes were on disk before the last was read


def test_export_reports_and_cancels_through_a_job(models, tmp_path):
    """One step per tensor, named, through the one job protocol; a cancelled job leaves nothing."""
    from checkpoints.jobs import Cancelled, Job

    ckpt = resolve(models["llama"])
    plans = plan_model(ckpt, "f32")
    job = Job.recording()
    export_gguf(ckpt, tmp_path / "j.gguf", qtype="f32", job=job)
    assert [text for _, text in job.events] == [p.name for p in plans] and len(plans) > 10
    assert [f for f, _ in job.events] == [(i + 1) / len(plans) for i in range(len(plans))]
    stop = Job(listener=lambda fraction, text: stop.cancel() if fraction >= 0.5 else None)
    with pytest.raises(Cancelled, match="the GGUF export was cancelled; nothing was written"):
        export_gguf(ckpt, tmp_path / "c.gguf", qtype="f32", job=stop)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["j.gguf"]
    with pytest.raises(ValueError, match="not both"):
        export_gguf(ckpt, tmp_path / "b.gguf", qtype="f32", job=Job(), progress=lambda *a: None)


def test_the_write_check_compares_count_and_size(exports):
    from checkpoints.gguf_export import _check_written

    path = exports["llama", "q8_0"]
    size = path.stat().st_size
    assert _check_written(path, 39, size) == size
    with pytest.raises(WeightsmithError, match="inconsistent"):
        _check_written(path, 39, size + 32)  # a tensor's bytes missing or extra
    with pytest.raises(WeightsmithError, match="inconsistent"):
        _check_written(path, 40, size)


def test_cancel_and_errors_leave_nothing(models, tmp_path):
    cancel = threading.Event()

    def progress(done, total, name):
        cancel.set()

    with pytest.raises(WeightsmithError, match="cancelled"):
        export_gguf(models["llama"], tmp_path / "c.gguf", progress=progress, cancel=cancel)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "keep.gguf").write_bytes(b"old")
    with pytest.raises(WeightsmithError, match="already exists"):
        export_gguf(models["llama"], tmp_path / "keep.gguf")
    assert (tmp_path / "keep.gguf").read_bytes() == b"old"
    with pytest.raises(WeightsmithError, match="unknown GGUF type 'q3_k'"):
        export_gguf(models["llama"], tmp_path / "x.gguf", qtype="q3_k")


def test_unsupported_architecture_is_one_clear_error(tmp_path):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=4, intermediate_size=64))
    folder = _save(model, tmp_path / "neox")
    with pytest.raises(WeightsmithError, match="does not support architecture 'gpt_neox': supported are gpt2, llama, "
                                               "mistral, qwen2"):
        export_gguf(folder, tmp_path / "n.gguf")
    assert not (tmp_path / "n.gguf").exists()


def test_non_finite_weights_are_refused(models, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "nan"
    shutil.copytree(models["llama"], folder)
    state = load_file(str(folder / "model.safetensors"))
    state["model.layers.2.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(WeightsmithError, match="model.layers.2.mlp.up_proj.weight has NaN"):
        export_gguf(folder, tmp_path / "nan.gguf", qtype="q8_0")
    assert not (tmp_path / "nan.gguf").exists()


# ---------------------------------------------------------------------------
# transformers loads the files: same greedy text, same token ids
# ---------------------------------------------------------------------------


def _greedy(model, tok, prompt: str, n: int = 8) -> list[int]:
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("arch", ["llama", "llama_tied", "gpt2"])
@pytest.mark.parametrize("qtype", ["f16", "q8_0"])
def test_transformers_loads_export_and_generates_the_same(models, exports, arch, qtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    src = AutoModelForCausalLM.from_pretrained(models[arch], dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(models[arch])
    path = exports[arch, qtype]
    loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    gtok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for prompt in PROMPTS:
        assert gtok(prompt).input_ids == tok(prompt).input_ids, prompt
        assert _greedy(loaded, gtok, prompt) == _greedy(src, tok, prompt), prompt
    assert gtok.eos_token == tok.eos_token and gtok.bos_token == tok.bos_token
    ids = tok(PROMPTS[1], return_tensors="pt").input_ids
    with torch.no_grad():
        diff = (loaded(ids).logits - src(ids).logits).abs().max()
    assert 0 < diff < (0.05 if qtype == "f16" else 0.5)  # quantised (not a copy of the source), yet close


def test_tokenizer_metadata_is_what_llama_cpp_reads(exports):
    import gguf

    r = _reader(exports["llama", "q8_0"])
    f = r.fields
    assert f["tokenizer.ggml.model"].contents() == "gpt2"
    assert f["tokenizer.ggml.pre"].contents() == "gpt-2"
    tokens = f["tokenizer.ggml.tokens"].contents()
    types = f["tokenizer.ggml.token_type"].contents()
    assert len(tokens) == 64 and tokens[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert types[:3] == [gguf.TokenType.CONTROL] * 3 and types[10] == gguf.TokenType.NORMAL
    assert tokens[-1] == "[PAD63]" and types[-1] == gguf.TokenType.UNUSED  # BPE vocab 61 < vocab_size 64
    assert f["tokenizer.ggml.bos_token_id"].contents() == 1 and f["tokenizer.ggml.eos_token_id"].contents() == 2
    assert f["tokenizer.chat_template"].contents() == CHAT
    assert len(f["tokenizer.ggml.merges"].contents()) > 0


def test_unknown_pre_tokenizer_is_refused(models, tmp_path):
    folder = tmp_path / "odd"
    shutil.copytree(models["llama"], folder)
    data = json.loads((folder / "tokenizer.json").read_text())
    data["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "[a-z]+"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    (folder / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(WeightsmithError, match="no llama.cpp equivalent"):
        export_gguf(folder, tmp_path / "odd.gguf")


def test_mistral_with_a_sentencepiece_style_tokenizer(tmp_path):
    """Byte-fallback BPE (Llama 2 / Mistral style) is written as llama.cpp's "llama" tokenizer; mistral runs as llama."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
    from transformers import (AutoModelForCausalLM, AutoTokenizer, MistralConfig, MistralForCausalLM,
                              PreTrainedTokenizerFast)

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(TEXT * 4, trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                          show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(vocab_size=304, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=128)).eval()
    model.save_pretrained(tmp_path / "m")
    fast.save_pretrained(tmp_path / "m")
    export_gguf(tmp_path / "m", tmp_path / "m.gguf", qtype="f32")
    f = _reader(tmp_path / "m.gguf").fields
    assert f["general.architecture"].contents() == "llama" and f["tokenizer.ggml.model"].contents() == "llama"
    assert f["tokenizer.ggml.tokens"].contents()[3] == "<0x00>" and len(f["tokenizer.ggml.tokens"].contents()) == 304
    gtok = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    for prompt in ["The capital of France is", "Rome é Itália 123"]:  # byte fallback for é, á
        assert gtok(prompt).input_ids == fast(prompt).input_ids
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf").eval()
    ids = fast("The capital of", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)  # f32, q/k permuted and back: exact


def test_qwen2_with_attention_biases(tmp_path):
    """qwen2: its own llama.cpp architecture, q/k/v biases, no rotary permute; transformers reads it back exactly."""
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                         tie_word_embeddings=False)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)  # non-zero biases, so a lost or misplaced bias shows
    folder = _save(model, tmp_path / "qwen2")
    export_gguf(folder, tmp_path / "q.gguf", qtype="f32")
    names = {t.name: t.tensor_type.name for t in _reader(tmp_path / "q.gguf").tensors}
    assert _reader(tmp_path / "q.gguf").fields["general.architecture"].contents() == "qwen2"
    assert names["blk.0.attn_q.bias"] == "F32" and "output.weight" in names
    assert check_gguf(tmp_path / "q.gguf", resolve(folder)).ok
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="q.gguf").eval()
    ids = torch.tensor([[5, 9, 17, 3, 40]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
