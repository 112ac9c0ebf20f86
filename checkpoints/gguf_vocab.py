"""Tokenizer metadata for GGUF export, written the way llama.cpp's ``convert_hf_to_gguf.py`` writes it.

Two tokenizer families are supported, both read from the checkpoint's ``tokenizer.json``:

* byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM): ``tokenizer.ggml.model = "gpt2"``, the
  token list with token types (NORMAL, CONTROL for special added tokens, USER_DEFINED for
  other added tokens, UNUSED ``[PADn]`` fillers up to the config's vocab size), the merges,
  and ``tokenizer.ggml.pre``, which tells llama.cpp how to split text before BPE;
* SentencePiece-style BPE with byte fallback (Llama 2, Mistral): ``tokenizer.ggml.model = "llama"``
  with scores and types from :class:`gguf.vocab.LlamaHfVocab`.

Special token ids, the add-BOS/EOS flags and the chat template come from
:class:`gguf.vocab.SpecialVocab`, the class llama.cpp's converter itself uses.

``tokenizer.ggml.pre`` is found from the *definition* of the pre-tokenizer in
``tokenizer.json`` (table :data:`PRE_TOKENIZERS`), not from a hash of encoded
text as the converter does; an unknown one is an error, as in the converter,
because llama.cpp would silently split text differently from the model's training.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from .containment import member_path
from .errors import WeightsmithError
from .textfiles import read_text

log = logging.getLogger(__name__)

# The Split regexes of the tokenizer.json files whose llama.cpp pre-tokenizer we name.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# pre-tokenizer signature -> llama.cpp's name (llama-vocab.cpp ``LLAMA_VOCAB_PRE_TYPE_*``).
# A signature lists the steps of the pre-tokenizer: ("ByteLevel", use_regex) or ("Split", regex)
# or ("Digits", individual_digits).
PRE_TOKENIZERS: dict[tuple, str] = {
    (("ByteLevel", True),): "gpt-2",  # GPT-2's own regex inside ByteLevel
    (("Digits", True), ("ByteLevel", True)): "smollm",  # SmolLM/StarCoder: single digits, then GPT-2's regex
    (("Split", _LLAMA3_SPLIT), ("ByteLevel", False)): "llama-bpe",
    (("Split", _QWEN2_SPLIT), ("ByteLevel", False)): "qwen2",
}


def _signature(pre: dict[str, Any] | None) -> tuple:
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    sig = []
    for step in steps:
        kind = step.get("type")
        if kind == "ByteLevel":
            sig.append((kind, bool(step.get("use_regex", True))))
        elif kind == "Split":
            pattern = step.get("pattern", {})
            sig.append((kind, pattern.get("Regex", pattern.get("String"))))
        elif kind == "Digits":
            sig.append((kind, bool(step.get("individual_digits", False))))
        else:
            sig.append((kind, None))
    return tuple(sig)


def pre_tokenizer_name(tokenizer_json: dict[str, Any]) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a byte-level BPE ``tokenizer.json``; one clear error if unknown."""
    sig = _signature(tokenizer_json.get("pre_tokenizer"))
    name = PRE_TOKENIZERS.get(sig)
    if name is None:
        shown = ", ".join(f"{k}({str(v)[:40]})" for k, v in sig) or "none"
        raise WeightsmithError(
            f"tokenizer pre-tokenizer [{shown}] has no llama.cpp equivalent known here "
            f"(known: GPT-2, SmolLM, Llama 3, Qwen2); llama.cpp would split text differently"
        )
    return name


def pre_tokenizer_of(name: str):
    """The ``tokenizers`` pre-tokenizer that llama.cpp's ``tokenizer.ggml.pre = name`` stands for, or None.

    The inverse of :func:`pre_tokenizer_name`, from the same table, so that a GGUF turned into a
    ``tokenizer.json`` and exported again keeps its name (``smollm`` stays ``smollm``).
    """
    from tokenizers import Regex, pre_tokenizers

    signature = next((sig for sig, known in PRE_TOKENIZERS.items() if known == name), None)
    if signature is None:
        return None
    steps = []
    for kind, value in signature:
        if kind == "ByteLevel":
            steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=value))
        elif kind == "Digits":
            steps.append(pre_tokenizers.Digits(individual_digits=value))
        else:  # Split: the pieces the regex matches are kept, each on its own
            steps.append(pre_tokenizers.Split(Regex(value), behavior="isolated"))
    return steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)


def _read_tokenizer_json(folder: Path) -> dict[str, Any]:
    if not (folder / "tokenizer.json").is_file():
        raise WeightsmithError("GGUF export needs the model's tokenizer.json (a fast tokenizer); none was found")
    # A file the checkpoint names stays inside it (a link to a server file is refused), read as UTF-8.
    path = member_path(folder, "tokenizer.json", owner="GGUF export")
    try:
        return json.loads(read_text(path, what="tokenizer"))
    except ValueError as e:
        raise WeightsmithError(f"tokenizer.json: corrupt JSON ({e})") from None


def _looks_special(token: str) -> bool:
    """Added tokens llama.cpp's converter treats as control tokens even when not flagged special."""
    return (token in ("<pad>", "<mask>") or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<unused") and token.endswith(">")))


def _byte_level_tokens(folder: Path, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings and types, id by id, as the converter's ``get_vocab_base`` lists them."""
    import gguf
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    vocab = tok.get_vocab()
    if vocab and max(vocab.values()) >= vocab_size:
        raise WeightsmithError(f"tokenizer has token id {max(vocab.values())} but the model's vocab_size is {vocab_size}")
    reverse = {i: t for t, i in vocab.items()}
    added = tok.get_added_vocab()
    decoder = tok.added_tokens_decoder
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")  # rows of the embedding no token uses
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        if token in added:
            # llama.cpp expects added tokens pre-normalized, as the tokenizer would see them
            if i in decoder and not decoder[i].normalized:
                token = tok.decode(tok.encode(token, add_special_tokens=False))
            special = bool(i in decoder and decoder[i].special)
            types.append(gguf.TokenType.CONTROL if special or _looks_special(token) else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    return tokens, types


def add_tokenizer(writer, folder: Path, config: dict[str, Any], gguf_arch: str) -> str:
    """Write the tokenizer keys of the checkpoint in ``folder`` to ``writer``; returns the tokenizer model name."""
    import gguf

    folder = Path(folder)
    data = _read_tokenizer_json(folder)
    model = data.get("model", {})
    vocab_size = int(config.get("vocab_size") or len(model.get("vocab", {})))
    decoder_type = (data.get("decoder") or {}).get("type")
    if model.get("type") == "BPE" and not model.get("byte_fallback") and decoder_type == "ByteLevel":
        pre = pre_tokenizer_name(data)
        tokens, types = _byte_level_tokens(folder, vocab_size)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens))
        kind = "gpt2"
    elif model.get("type") == "BPE" and model.get("byte_fallback"):
        try:
            vocab = gguf.LlamaHfVocab(folder)
        except (FileNotFoundError, TypeError) as e:
            raise WeightsmithError(f"tokenizer.json: not a SentencePiece-style BPE tokenizer ({e})") from None
        tokens, scores, types = [], [], []
        for text, score, toktype in vocab.all_tokens():
            tokens.append(text)
            scores.append(score)
            types.append(toktype)
        while len(tokens) < vocab_size:  # embedding rows no token uses
            tokens.append(f"[PAD{len(tokens)}]".encode())
            scores.append(-1000.0)
            types.append(gguf.TokenType.UNUSED)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        special = gguf.SpecialVocab(folder, n_vocab=len(tokens))
        kind = "llama"
    else:
        raise WeightsmithError(
            f"tokenizer type {model.get('type')!r} (decoder {decoder_type!r}) cannot be written to GGUF here: "
            "supported are byte-level BPE and SentencePiece-style BPE tokenizers"
        )
    special.add_to_gguf(writer, quiet=True)
    if gguf_arch == "llama" and vocab_size == 49152:
        # llama.cpp's converter turns BOS off for this vocabulary size (SmolLM, Granite small): these
        # models were trained without it (the SmolLM2 GGUF we ship has add_bos_token = false too).
        writer.add_add_bos_token(False)
    log.debug("tokenizer: %s model, %d tokens", kind, len(tokens))
    return kind
