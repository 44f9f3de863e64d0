"""PEFT-format adapters and merged float models, checked by loading them with peft and transformers."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from engine.export import attach_adapter, merged_float_model, save_adapter, save_merged
from engine.model import quantize_model
from engine.quant import RTNQuantizer
from engine.model import add_lora, set_active_rank


def trained_looking(model, seed=0):
    """Random non-zero B so the adapter changes the output (a fresh one would not)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_b"):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    return model


@pytest.fixture()
def lora_model(float_model):
    model = copy.deepcopy(float_model[0])
    add_lora(model, 8, 16, seed=0)
    return trained_looking(model)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_peft_loads_our_adapter_and_matches_our_merged_model(float_model, lora_model, valid_windows, tmp_path):
    model, tokenizer = float_model
    save_adapter(lora_model, tmp_path / "adapter", "stories260K")
    save_merged(lora_model, tokenizer, tmp_path / "merged")
    ids = valid_windows[:2, :128]
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    ours, theirs, folded = logits(lora_model, ids), logits(peft_model, ids), logits(merged, ids)
    assert not torch.allclose(ours, logits(model, ids), atol=1e-3)  # the adapter matters
    assert (theirs - folded).abs().max() < 1e-5 * folded.abs().max()  # float32 rounding only
    assert (theirs - ours).abs().max() < 1e-5 * folded.abs().max()
    # in float64 the three computations agree to rounding of the stored float32 merged weights
    merged64, peft64 = merged.double(), peft_model.double()
    assert (logits(merged64, ids) - logits(peft64, ids)).abs().max() < 1e-5


def test_adapter_round_trip_on_a_quantized_model(float_model, valid_windows, tmp_path):
    model = copy.deepcopy(float_model[0])
    quantize_model(model, RTNQuantizer(bits=3, group_size=32))
    base = copy.deepcopy(model)
    add_lora(model, 4, 8, seed=0)
    trained_looking(model, seed=1)
    save_adapter(model, tmp_path / "adapter", "q3")
    attach_adapter(base, tmp_path / "adapter")
    ids = valid_windows[:2, :64]
    assert torch.equal(logits(base, ids), logits(model, ids))
    merged = merged_float_model(model)
    assert torch.allclose(logits(merged, ids), logits(model, ids), atol=1e-4)


def test_cut_to_rank_keeps_the_trained_scale(lora_model, float_model, valid_windows, tmp_path):
    save_adapter(lora_model, tmp_path / "r2", "stories260K", rank=2)
    cut = copy.deepcopy(float_model[0])
    config = attach_adapter(cut, tmp_path / "r2")
    assert config["r"] == 2 and config["lora_alpha"] == 16 * 2 / 8  # PEFT's alpha / r is the trained 16 / 8
    set_active_rank(lora_model, 2)
    ids = valid_windows[:1, :64]
    assert torch.allclose(logits(cut, ids), logits(lora_model, ids), atol=1e-6)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(float_model[0]), tmp_path / "r2")
    assert torch.allclose(logits(peft_model, ids), logits(lora_model, ids), atol=1e-4)


def test_merged_export_of_a_quantized_directory_block_by_block(float_model, tmp_path):
    """``modulora export --merged`` on a finetune of a quantized directory reads its blocks one at a time: transformers
    loads the sharded result, equal to the quantized model with its adapter."""
    from conftest import GGUF_MODEL, TRAIN_TXT, modulora
    from engine.pipelines import load_with_adapter

    assert modulora("quantize", GGUF_MODEL, "--bits", "3", "--out", tmp_path / "q") == 0
    assert modulora("finetune", tmp_path / "q", "--data", TRAIN_TXT, "--seq-len", "64", "--limit", "16", "--steps", "3",
                    "--out", tmp_path / "run") == 0
    assert modulora("export", tmp_path / "run", "--merged", "--out", tmp_path / "exp") == 0
    shards = sorted(p.name for p in (tmp_path / "exp" / "merged").glob("model-*.safetensors"))
    assert len(shards) == 6  # five blocks and what is outside them
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "exp" / "merged")
    ours, _, _ = load_with_adapter(tmp_path / "run")
    ids = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(1))
    assert torch.allclose(logits(merged, ids), logits(ours, ids), atol=1e-4)
