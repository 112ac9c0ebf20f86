"""The Export tab's GGUF handlers: size estimate, export into the item with progress, card, push in one commit."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ui.config import AppConfig  # noqa: E402
from ui.layout import build_app  # noqa: E402
from ui.workbench import Workbench  # noqa: E402
from checkpoints.cards import CardInfo, write_card  # noqa: E402
from hub_fixtures import GOOD_TOKEN, fake_hub, hub_env, no_internet  # noqa: E402,F401
from test_gguf_export import _save, _trained  # noqa: E402
from checkpoints.sizes import parse_size  # noqa: E402


def req(name: str) -> SimpleNamespace:
    return SimpleNamespace(session_hash=name)


@pytest.fixture(scope="module")
def tiny_bpe_llama(tmp_path_factory) -> Path:
    from conftest import build_tiny_llama

    return _save(_trained(build_tiny_llama(0), steps=10), tmp_path_factory.mktemp("gguf-app") / "llama")


@pytest.fixture
def wb(tmp_path):
    return Workbench(AppConfig(workspace_root=tmp_path / "ws"))


def _item(wb, session: str, folder: Path, name: str) -> str:
    msg = wb.upload([str(p) for p in folder.iterdir() if p.is_file()], name, "", req(session))
    assert f"ws:{name}" in msg
    return f"ws:{name}"


def test_export_gguf_into_the_item_and_push_it_in_one_commit(wb, tiny_bpe_llama, hub_env, fake_hub):
    ref = _item(wb, "a", tiny_bpe_llama, "mymodel")
    folder = wb.workspace(req("a")).item_path(ref)
    write_card(folder, CardInfo(title="mymodel", relation="finetune", base_models=[], summary="A test model."))
    estimate = wb.gguf_estimate(ref, "q8_0", req("a"))
    calls = []
    path, msg = wb.export_gguf(ref, "q8_0", req("a"), lambda frac, desc=None: calls.append(frac))
    gguf = Path(path)
    assert gguf.parent == folder and gguf.name == "mymodel-q8_0.gguf"
    assert msg.startswith("wrote mymodel-q8_0.gguf: ") and "within its type's error bound" in msg
    # the estimate counts the tensors' bytes: the file adds only header and tokenizer (~KBs here)
    estimated = parse_size(estimate.split("**")[1].replace(" ", ""))  # e.g. "43.9 KB", decimal units
    assert 0 < gguf.stat().st_size - estimated < 0.05 * 2**20
    assert calls and calls[-1] == pytest.approx(1.0) and calls == sorted(calls)  # progress, tensor by tensor
    card = (folder / "README.md").read_text()
    assert "- gguf" in card.split("---")[1] and "FROM ./mymodel-q8_0.gguf" in card and "llama-cli -m" in card
    assert "mymodel-q8_0.gguf" in wb.card_preview(ref, req("a"))
    # a second type joins the first; the card lists both
    wb.export_gguf(ref, "q4_0", req("a"), None)
    card = (folder / "README.md").read_text()
    assert card.count("## Run it with llama.cpp or Ollama (GGUF)") == 1 and "`mymodel-q4_0.gguf`" in card
    # Push: weights, card and both GGUF files in one commit
    wb.push(ref, "alice/mymodel", False, GOOD_TOKEN, req("a"), None, None)
    files = fake_hub.files("alice/mymodel")
    assert {"model.safetensors", "mymodel-q8_0.gguf", "mymodel-q4_0.gguf", "README.md"} <= set(files)
    last = fake_hub.commits("alice/mymodel")[-1]  # one commit carries the weights and both GGUF files
    assert {"model.safetensors", "mymodel-q8_0.gguf", "mymodel-q4_0.gguf"} <= set(last.lfs)
    assert files["mymodel-q8_0.gguf"] == gguf.read_bytes()
    assert "gguf" in fake_hub.front_matter("alice/mymodel")["tags"]


def test_gguf_handlers_refuse_bad_input(wb, tiny_bpe_llama):
    with pytest.raises(gr.Error, match="choose a workspace item"):
        wb.export_gguf("", "q8_0", req("a"), None)
    ref = _item(wb, "a", tiny_bpe_llama, "m2")
    with pytest.raises(gr.Error) as e:
        wb.export_gguf(ref, "q3_k", req("a"), None)  # not one of the offered types: refused before running
    assert "\n" not in str(e.value)
    with pytest.raises(gr.Error, match="no such item"):
        wb.export_gguf(ref, "q8_0", req("b"), None)  # another session's item
    assert "Choose a workspace item" in wb.gguf_estimate("", "q8_0", req("a"))
    assert not list(wb.workspace(req("a")).item_path(ref).glob("*.gguf"))


def test_export_tab_offers_gguf():
    demo = build_app()
    labels = {getattr(c, "label", None) for c in demo.blocks.values()}
    assert "GGUF type" in labels
    assert any(getattr(fn, "api_name", None) == "export_gguf" for fn in demo.fns.values())


def test_a_mixed_adapter_item_exports_as_a_gguf_lora(tmp_path, tiny_bpe_llama):
    """An adapter item (a mix made in the app) is exported against the base it was mixed on."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    wb = Workbench(AppConfig(workspace_root=tmp_path / "ws", named_models={"tiny": str(tiny_bpe_llama)}))
    torch.manual_seed(3)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_bpe_llama),
                                LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                           init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "ad")
    wb.upload([str(p) for p in (tmp_path / "ad").iterdir() if p.suffix in (".json", ".safetensors")], "ad", "",
              req("a"))
    wb.mix_adapters("base_model: tiny\nadapters:\n  - {adapter: ws:ad, weight: 0.5}\nmethod: cat\n", "mix",
                    req("a"), None)
    estimate = wb.gguf_estimate("ws:mix", "f16", req("a"))
    assert "** of weights" in estimate and parse_size(estimate.split("**")[1].replace(" ", "")) > 0
    path, msg = wb.export_gguf("ws:mix", "f16", req("a"), None)
    assert msg.startswith("wrote adapter mix-f16.gguf: ") and ", 16 tensors (" in msg  # 4 blocks x q, v x A, B
    assert "within its type's error bound" in msg  # the product B·A read back against PEFT's ΔW
    from test_gguf_export import _reader

    r = _reader(path)
    assert r.fields["general.type"].contents() == "adapter" and r.fields["adapter.type"].contents() == "lora"
    card = (Path(path).parent / "README.md").read_text()
    assert "--lora mix-f16.gguf" in card and "ADAPTER ./mix-f16.gguf" in card
