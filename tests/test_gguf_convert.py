"""GGUF -> Hugging Face folder (checkpoints/gguf_convert.py): the tokenizer splits text as the file says.

The tiny tokenizer is SmolLM's kind: BPE learned with GPT-2's regex over text full of numbers
(so it has tokens such as "Ġ1234"), then used with SmolLM's pre-tokenizer, which puts each
digit on its own first. llama.cpp calls that ``tokenizer.ggml.pre = smollm``. transformers reads
such a file with GPT-2's split only, which keeps " 12345" whole ("Ġ12345"); the converter must
give back single digits, and exporting the converted folder must name ``smollm`` again.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from checkpoints import gguf_convert
from checkpoints.gguf_convert import MARKER, convert_gguf
from checkpoints.gguf_export import add_model_metadata, export_gguf
from checkpoints.sources import resolve

TEXT = ["In 1999, 42 people paid 12345 for 123 maps.", "12 123 1234 12345 and 2024.", "3.14159 is pi, 42 is not."]
DIGITS = [" 12345", "In 1999, 42 people", "3.14159", "x12y 2024", "12345"]
SINGLE = ["Ġ", "1", "2", "3", "4", "5"]  # " 12345" split as SmolLM does


def _smollm_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(TEXT * 4, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                          show_progress=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=specials[0], bos_token=specials[1],
                                   eos_token=specials[2], pad_token=specials[2])


def _pre_of(path) -> str:
    from transformers.integrations.gguf.reader import read_gguf_metadata

    return read_gguf_metadata(str(path), ())[0]["tokenizer.ggml.pre"]


@pytest.fixture(scope="module")
def smollm_gguf(tmp_path_factory):
    """(source folder, its tokenizer, its GGUF export) of a tiny llama with SmolLM's pre-tokenizer."""
    from conftest import build_tiny_llama

    root = tmp_path_factory.mktemp("gguf-convert")
    model = build_tiny_llama(0)
    tok = _smollm_tokenizer(model.config.vocab_size)
    assert "Ġ1234" in tok.get_vocab()  # merges across digits exist
    model.save_pretrained(root / "src")
    tok.save_pretrained(root / "src")
    export_gguf(root / "src", root / "src.gguf", qtype="f32")
    return root / "src", tok, root / "src.gguf"


def test_round_trip_keeps_the_digit_pre_tokenizer(smollm_gguf, tmp_path):
    from transformers import AutoTokenizer

    src, tok, path = smollm_gguf
    assert _pre_of(path) == "smollm"
    assert tok.tokenize(" 12345") == SINGLE
    # non-vacuity: transformers alone reads the file with GPT-2's split and joins the digits
    plain = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    assert plain.tokenize(" 12345") == ["Ġ12345"]

    folder = convert_gguf(path, out_dir=tmp_path / "conv")
    back = AutoTokenizer.from_pretrained(folder)
    assert back.tokenize(" 12345") == SINGLE
    for text in DIGITS:
        assert back(text).input_ids == tok(text).input_ids, text
    assert (folder / MARKER).read_text() == str(gguf_convert.CONVERSION)

    export_gguf(folder, tmp_path / "again.gguf", qtype="f32")
    assert _pre_of(tmp_path / "again.gguf") == _pre_of(path) == "smollm"
    # the weights made the round trip too
    ids = torch.tensor([tok(" 12345 people").input_ids])
    with torch.no_grad():
        assert torch.equal(resolve(folder).load_model()(ids).logits, resolve(src).load_model()(ids).logits)


def test_an_older_conversion_gets_its_tokenizer_redone(smollm_gguf, tmp_path):
    """A folder converted before the repair (no marker, GPT-2 split) is fixed on the next call; weights untouched."""
    from transformers import AutoTokenizer

    _, tok, path = smollm_gguf
    folder = convert_gguf(path, out_dir=tmp_path / "conv")
    data = json.loads((folder / "tokenizer.json").read_text())
    data["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    (folder / "tokenizer.json").write_text(json.dumps(data))
    (folder / MARKER).unlink()
    assert AutoTokenizer.from_pretrained(folder).tokenize(" 12345") != SINGLE  # the old state
    weights = next(folder.glob("*.safetensors"))
    before = os.stat(weights)

    assert convert_gguf(path, out_dir=tmp_path / "conv") == folder
    assert AutoTokenizer.from_pretrained(folder).tokenize(" 12345") == SINGLE
    after = os.stat(weights)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert not [p for p in folder.iterdir() if ".partial-" in p.name]  # no staging left behind
    mtime = (folder / "tokenizer.json").stat().st_mtime_ns
    convert_gguf(path, out_dir=tmp_path / "conv")  # marked now: nothing is rewritten
    assert (folder / "tokenizer.json").stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_demo_export_names_the_shipped_pre_tokenizer(demo_dir, tmp_path):
    """The shipped SmolLM2 GGUF says ``smollm``; the demo folder splits digits singly and its export says so too."""
    from checkpoints.demo import demo_gguf_file
    from transformers import AutoTokenizer

    from tokenizers import Tokenizer, pre_tokenizers

    shipped = demo_gguf_file()
    assert _pre_of(shipped) == "smollm"
    tok = AutoTokenizer.from_pretrained(demo_dir)
    assert tok.tokenize("12345") == ["1", "2", "3", "4", "5"]
    # SmolLM's vocabulary has no token mixing digits with anything, so GPT-2's split differs only in
    # what is left around the digits: spaces before a number stay one run ("ĠĠ") when digits go first
    assert tok.tokenize("x =  12") == ["x", "Ġ=", "ĠĠ", "1", "2"]
    gpt2 = Tokenizer.from_file(str(demo_dir / "tokenizer.json"))
    gpt2.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # what the folder had before
    assert gpt2.encode("x =  12").tokens == ["x", "Ġ=", "Ġ", "Ġ", "1", "2"]
    ckpt = resolve("demo")
    # the metadata half of an export (no tensors): the keys export_gguf writes, by the function it uses
    import gguf

    writer = gguf.GGUFWriter(tmp_path / "meta.gguf", "llama")
    add_model_metadata(writer, ckpt, "f16", ckpt.name)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    assert _pre_of(tmp_path / "meta.gguf") == _pre_of(shipped)
