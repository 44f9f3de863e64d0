"""GPT-2 and the other ``Conv1D`` models (weights stored ``[in, out]``): quantized, finetuned and exported like any
linear layer, checked against transformers' own GPT-2 forward and PEFT's Conv1D LoRA (``fan_in_fan_out``).

The model is a tiny random-weight GPT-2 written in the Hugging Face layout with the shared model's tokenizer (no
GPT-2 weights are on this machine)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from conftest import GGUF_MODEL, TRAIN_TXT, modulora
from engine.lora import ModuLoRALinear
from engine.model import load_model, target_linear_names

CALIB = ("--calib", TRAIN_TXT, "--calib-windows", 8, "--calib-seq-len", 64)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory) -> Path:
    from engine.model.loading import gguf_config_and_tokenizer

    path = tmp_path_factory.mktemp("gpt2") / "gpt2"
    _, tokenizer = gguf_config_and_tokenizer(GGUF_MODEL)
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=len(tokenizer), n_positions=256,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def ids() -> torch.Tensor:
    return torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(3))


def reference_with(gpt2: Path, model: torch.nn.Module) -> GPT2LMHeadModel:
    """transformers' GPT-2, its Conv1D weights replaced by ``model``'s dequantized ones (transposed back)."""
    reference = GPT2LMHeadModel.from_pretrained(gpt2).eval()
    for name, layer in model.named_modules():
        if isinstance(layer, ModuLoRALinear):
            conv = reference.get_submodule(name)
            assert isinstance(conv, Conv1D)
            conv.weight.data = layer.base.dequantize(dtype=torch.float32).T.contiguous()
    return reference


@pytest.mark.parametrize("method", [("rtn", "--bits", 4), ("optq", "--bits", 3, *CALIB)], ids=["rtn", "optq"])
def test_quantized_gpt2_is_transformers_gpt2_with_the_dequantized_weights(gpt2, tmp_path, method):
    assert modulora("quantize", gpt2, "--method", *method, "--out", tmp_path / "q") == 0
    model, _, manifest = load_model(tmp_path / "q")
    float_model = GPT2LMHeadModel.from_pretrained(gpt2)
    assert len(manifest["layers"]) == 8 == len(target_linear_names(float_model))  # c_attn, c_proj, c_fc, c_proj
    for name, layer in model.named_modules():
        if isinstance(layer, ModuLoRALinear):
            assert layer.fan_in_fan_out
            weight = float_model.get_submodule(name).weight.T  # [out, in]
            error = (layer.base.dequantize(dtype=torch.float32) - weight).norm() / weight.norm()
            assert error < 0.3  # the [in, out] weight read as [out, in] would be a different matrix (c_proj: square)
    with torch.no_grad():
        got = model(input_ids=ids()).logits
        want = reference_with(gpt2, model)(input_ids=ids()).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_finetuned_gpt2_exports_for_transformers_and_peft(gpt2, tmp_path):
    from peft import PeftModel

    assert modulora("quantize", gpt2, "--method", "rtn", "--bits", 4, "--out", tmp_path / "q") == 0
    assert modulora("finetune", tmp_path / "q", "--data", TRAIN_TXT, "--limit", 8, "--seq-len", 64, "--steps", 3,
                    "--batch-size", 4, "--rank", 4, "--lr", 1e-2, "--save-every", 0, "--out", tmp_path / "run") == 0
    assert modulora("export", tmp_path / "run", "--merged", "--out", tmp_path / "export") == 0
    run, _, _ = load_model(tmp_path / "q")
    from engine.export import attach_adapter

    attach_adapter(run, tmp_path / "run" / "adapter")
    with torch.no_grad():
        ours = run(input_ids=ids()).logits
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "export" / "merged").eval()
        assert isinstance(merged.transformer.h[0].attn.c_attn, Conv1D)
        torch.testing.assert_close(merged(input_ids=ids()).logits, ours, rtol=1e-4, atol=1e-4)
        config = json.loads((tmp_path / "export" / "adapter" / "adapter_config.json").read_text())
        assert config["fan_in_fan_out"] is True
        peft = PeftModel.from_pretrained(reference_with(gpt2, run), tmp_path / "export" / "adapter").eval()
        torch.testing.assert_close(peft(input_ids=ids()).logits, ours, rtol=1e-5, atol=1e-5)
    assert (ours - reference_with(gpt2, run)(input_ids=ids()).logits).abs().max() > 1e-3  # the adapter changed it
