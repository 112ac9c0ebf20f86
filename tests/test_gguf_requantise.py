"""Re-quantising weights that came out of a GGUF, and reading GGUF blocks the way transformers does.

The demo model is the shipped SmolLM2 GGUF dequantised (Q4_1 matrices, a Q8_0 token embedding).
These cases pin down what a q8_0 export of such weights can and cannot keep, and that transformers'
own dequantiser (``integrations.gguf.dequant``, its newer loading path; for llama it still takes the legacy
path through ``gguf.quants``, compared in tests/test_gguf_export.py) gives the values our decoder gives.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from checkpoints.gguf_check import decode, error_bound


def _blocks(kind: str, rows: int = 8, cols: int = 128, seed: int = 0) -> np.ndarray:
    """Values exactly representable in ``kind`` (a GGML type name): random weights quantised once."""
    import gguf

    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, cols)) * 0.05 + rng.uniform(-0.02, 0.02, (rows, 1))).astype(np.float32)
    q = gguf.GGMLQuantizationType[kind]
    return decode(gguf.quants.quantize(x, q), kind, x.shape)


def _requantise(x: np.ndarray, kind: str) -> np.ndarray:
    import gguf

    return decode(gguf.quants.quantize(x, gguf.GGMLQuantizationType[kind]), kind, x.shape)


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q4_1"])
def test_transformers_dequantises_as_our_decoder(kind):
    import gguf
    from transformers.integrations.gguf.dequant import dequantize

    rng = np.random.default_rng(1)
    x = (rng.standard_normal((6, 96)) * 0.1).astype(np.float32)
    q = gguf.GGMLQuantizationType[kind]
    raw = gguf.quants.quantize(x, q)
    theirs = dequantize(torch.from_numpy(raw.reshape(-1).copy()), int(q)).numpy().reshape(x.shape)
    ours = decode(raw, kind, x.shape)
    np.testing.assert_array_equal(theirs, ours)
    assert not np.array_equal(ours, x)  # quantised values, not a copy of the input


def test_q8_0_from_dequantised_q8_0_is_bit_exact():
    """Same blocks of 32, the block's extreme is ±127·d, so the re-derived scale and integers are the same."""
    x = _blocks("Q8_0")
    np.testing.assert_array_equal(_requantise(x, "Q8_0"), x)


def test_q4_1_values_survive_q4_1_but_not_q8_0():
    """A Q4_1 block holds m + k·d (k = 0..15) with an arbitrary offset m; Q8_0 holds multiples of one scale,
    symmetric about 0, so it must round those values (within its bound), while Q4_1 itself keeps them."""
    x = _blocks("Q4_1")
    np.testing.assert_array_equal(_requantise(x, "Q4_1"), x)
    y = _requantise(x, "Q8_0")
    err = np.abs(y - x)
    assert (err <= error_bound(x, "Q8_0")).all()
    assert (err > 0).mean() > 0.5  # most values move: an offset grid does not fit a symmetric one
    # hand case, llama.cpp's quantize_row_q8_0_ref: d = amax/127, q = round(x/d), stored d in float16.
    # Block m + k/30 with m = 0.1: amax = 0.6, d = 0.6/127, and 0.1 is 21.17 steps: it comes back as 21 steps.
    block = np.float32(0.1) + (np.arange(32) % 16).astype(np.float32) * np.float32(1 / 30)
    d = np.abs(block).max() / np.float32(127)
    expected = np.round(block * (np.float32(1) / d)) * np.float32(np.float16(d))
    got = _requantise(block[None, :], "Q8_0")[0]
    np.testing.assert_array_equal(got, expected.astype(np.float32))
    assert got[0] == pytest.approx(21 * 0.6 / 127, rel=1e-3) and got[0] != block[0]
