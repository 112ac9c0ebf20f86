"""The recipe's tokenizer settings, in mergekit 0.1.5's layout.

Two spellings, never both in one recipe (mergekit refuses that too):

* ``tokenizer_source: base | union | <model>`` (the legacy key);
* a ``tokenizer:`` block::

      tokenizer:
        source: union            # base | union | <model>; union when left out
        pad_to_multiple_of: 64   # the vocabulary grows to a multiple of this
        tokens:
          <|im_start|>:
            source: org/chat-model             # take the row this model gives the token
          <|im_end|>:
            source: {kind: model_token, model: org/chat-model, token: </s>}
            force: true                        # even in models that have the token
          <pad>:
            source: {kind: zero}

A model named by a token's source must be one of the merge's inputs (its rows
are read from the same tensor). :func:`effective_tokenizer` gives the one
:class:`TokenizerConfig` the recipe means, or None when the output simply keeps
the reference model's tokenizer.

Example::

    cfg = TokenizerConfig.from_dict({"source": "union", "tokens": {"<x>": {"source": "./ft1"}}})
    cfg.to_dict()
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable

from checkpoints.errors import WeightsmithError

from .recipe_refs import read_model_ref

SOURCES = ("base", "union")


@dataclass(frozen=True)
class TokenSource:
    """Where a token's row comes from: a model's row for the same token (``kind="model"``),
    a model's row for another token (``"model_token"``, by ``token`` or ``token_id``), or zeros."""

    kind: str  # model | model_token | zero
    model: str | None = None
    token: str | None = None
    token_id: int | None = None

    def to_data(self) -> Any:
        if self.kind == "model":
            return self.model
        if self.kind == "zero":
            return {"kind": "zero"}
        key = {"token": self.token} if self.token is not None else {"token_id": self.token_id}
        return {"kind": "model_token", "model": self.model, **key}


@dataclass(frozen=True)
class TokenSetting:
    """One ``tokens:`` entry: its row source, and whether it replaces the token's row in every model."""

    source: TokenSource | None = None
    force: bool = False


@dataclass
class TokenizerConfig:
    """The output tokenizer: its ``source``, extra ``tokens`` and the vocabulary padding."""

    source: str = "union"
    tokens: dict[str, TokenSetting] = field(default_factory=dict)
    pad_to_multiple_of: int | None = None

    @classmethod
    def from_dict(cls, data: Any) -> "TokenizerConfig":
        if not isinstance(data, dict):
            raise WeightsmithError("recipe: tokenizer must be a mapping with source, tokens and/or pad_to_multiple_of")
        extra = set(data) - {"source", "tokens", "pad_to_multiple_of"}
        if extra:
            raise WeightsmithError(f"recipe: tokenizer has unknown key(s) {', '.join(sorted(map(str, extra)))} "
                                   "(supported: source, tokens, pad_to_multiple_of)")
        pad = data.get("pad_to_multiple_of")
        if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or pad < 1):
            raise WeightsmithError(f"recipe: tokenizer.pad_to_multiple_of must be a positive integer, got {pad!r}")
        tokens = data.get("tokens") or {}
        if not isinstance(tokens, dict):
            raise WeightsmithError("recipe: tokenizer.tokens must be a mapping of token: {source, force}")
        return cls(source=model_name(data.get("source", "union"), "tokenizer.source"),
                   tokens={str(t): _setting(s, str(t)) for t, s in tokens.items()},
                   pad_to_multiple_of=pad)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"source": self.source}
        if self.tokens:
            out["tokens"] = {t: {**({"source": s.source.to_data()} if s.source else {}),
                                 **({"force": True} if s.force else {})} for t, s in self.tokens.items()}
        if self.pad_to_multiple_of is not None:
            out["pad_to_multiple_of"] = self.pad_to_multiple_of
        return out

    def renamed(self, rename: Callable[[str], str]) -> "TokenizerConfig":
        """A copy with every model reference passed through ``rename``."""
        def src(s: TokenSource | None) -> TokenSource | None:
            return replace(s, model=rename(s.model)) if s is not None and s.model is not None else s

        return TokenizerConfig(self.source if self.source in SOURCES else rename(self.source),
                               {t: replace(s, source=src(s.source)) for t, s in self.tokens.items()},
                               self.pad_to_multiple_of)

    def token_models(self) -> list[str]:
        """The models the ``tokens`` entries take rows from."""
        return list(dict.fromkeys(s.source.model for s in self.tokens.values() if s.source and s.source.model))


def effective_tokenizer(recipe) -> TokenizerConfig | None:
    """What the recipe asks of the output tokenizer (``tokenizer:`` or ``tokenizer_source:``), or None."""
    if recipe.tokenizer is not None:
        return recipe.tokenizer
    if recipe.tokenizer_source is not None:
        return TokenizerConfig(source=recipe.tokenizer_source)
    return None


def check_tokenizer_settings(recipe) -> None:
    """mergekit's rules: one spelling only, and token rows only from the merge's inputs."""
    if recipe.tokenizer is not None and recipe.tokenizer_source is not None:
        raise WeightsmithError("recipe: give tokenizer or tokenizer_source, not both")
    cfg = effective_tokenizer(recipe)
    if cfg is None:
        return
    inputs = input_refs(recipe)
    for model in cfg.token_models():
        if model not in inputs:
            raise WeightsmithError(f"recipe: tokenizer.tokens takes rows from {model}, which is not one of the "
                                   f"merged models ({', '.join(inputs)})")


def input_refs(recipe) -> list[str]:
    """The models whose tensors are merged (``model_refs`` without a tokenizer-only donor)."""
    refs = [recipe.base_model] if recipe.base_model else []
    refs += [m.model for m in recipe.models]
    refs += [s.model for sl in recipe.slices for s in sl.sources]
    refs += [sl.base_model for sl in recipe.slices if sl.base_model]
    return list(dict.fromkeys(refs))


def model_name(value: Any, key: str) -> str:
    """A model reference (``{model: ...}`` allowed, as in mergekit); one error otherwise."""
    return read_model_ref(value, key)  # type: ignore[return-value]


def _setting(data: Any, token: str) -> TokenSetting:
    where = f"tokenizer.tokens[{token!r}]"
    if data is None:
        return TokenSetting()
    if not isinstance(data, dict) or set(data) - {"source", "force"}:
        raise WeightsmithError(f"recipe: {where} must be a mapping with source and/or force")
    force = data.get("force", False)
    if not isinstance(force, bool):
        raise WeightsmithError(f"recipe: {where}.force must be true or false, got {force!r}")
    return TokenSetting(_source(data.get("source"), where), force)


def _source(data: Any, where: str) -> TokenSource | None:
    if data is None:
        return None
    if not isinstance(data, dict) or "kind" not in data:
        return TokenSource("model", model=model_name(data, f"{where}.source"))
    kind = data["kind"]
    if kind == "zero":
        if set(data) != {"kind"}:
            raise WeightsmithError(f"recipe: {where}.source of kind zero takes no other key")
        return TokenSource("zero")
    if kind != "model_token":
        raise WeightsmithError(f"recipe: {where}.source kind must be zero or model_token, got {kind!r}")
    if set(data) - {"kind", "model", "token", "token_id"}:
        raise WeightsmithError(f"recipe: {where}.source (model_token) takes model and one of token, token_id")
    token, token_id = data.get("token"), data.get("token_id")
    if (token is None) == (token_id is None):
        raise WeightsmithError(f"recipe: {where}.source (model_token) needs exactly one of token, token_id")
    if data.get("model") is None:
        raise WeightsmithError(f"recipe: {where}.source (model_token) needs a model")
    if token_id is not None and (isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0):
        raise WeightsmithError(f"recipe: {where}.source.token_id must be a non-negative integer, got {token_id!r}")
    return TokenSource("model_token", model=model_name(data.get("model"), f"{where}.source.model"),
                       token=None if token is None else str(token), token_id=token_id)
