"""Real model: float and RTN perplexities, exact save/load, refusal of corrupt directories."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from engine.errors import EngineError
from engine.eval import perplexity
from engine.lora import ModuLoRALinear
from engine.model import load_quantized, model_size, quantize_model, save_quantized, target_linear_names
from engine.quant import RTNQuantizer

FLOAT_PPL = 4.49  # shared/README.md: fp32 stories260K on tinystories/valid.txt, 256-token windows
RTN_G32_PPL = {4: 4.90, 3: 7.90, 2: 323.0}


@pytest.fixture(scope="module")
def rtn_models(float_model):
    model, tokenizer = float_model
    out = {}
    for bits in RTN_G32_PPL:
        quantized = copy.deepcopy(model)
        quantize_model(quantized, RTNQuantizer(bits=bits, group_size=32))
        out[bits] = quantized
    return out


def test_float_perplexity(float_model, valid_windows):
    result = perplexity(float_model[0], valid_windows, progress=False)
    assert result.ppl == pytest.approx(FLOAT_PPL, rel=0.01)
    assert result.tokens == valid_windows.numel() - len(valid_windows)


def test_targets_are_all_decoder_linears(float_model):
    names = target_linear_names(float_model[0])
    assert len(names) == 5 * 7
    assert not any("lm_head" in n or "embed" in n for n in names)


@pytest.mark.parametrize("bits", sorted(RTN_G32_PPL))
def test_rtn_group32_perplexity(rtn_models, valid_windows, bits):
    result = perplexity(rtn_models[bits], valid_windows, progress=False)
    assert result.ppl == pytest.approx(RTN_G32_PPL[bits], rel=0.02)


def test_quantized_model_holds_no_dense_decoder_weights(rtn_models):
    model = rtn_models[3]
    layers = [m for m in model.modules() if isinstance(m, ModuLoRALinear)]
    assert len(layers) == 35
    assert not any(isinstance(m, torch.nn.Linear) for m in model.model.layers.modules())
    size = model_size(model)
    # 3-bit codes + fp16 scale + 3-bit zero per 32 weights; ragged 172 = 5*32+12 costs a little more
    assert 3 + 19 / 32 < size["bits_per_weight"] < 3.75


def test_save_load_is_bit_identical(rtn_models, float_model, valid_windows, tmp_path):
    model = rtn_models[2]
    manifest = save_quantized(model, float_model[1], tmp_path / "q2", {"quantizer": {"method": "rtn", "bits": 2}})
    loaded, tokenizer, read_back = load_quantized(tmp_path / "q2")
    assert read_back["layers"] == manifest["layers"]
    batch = valid_windows[:4]
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=batch).logits, model(input_ids=batch).logits)
    subset = valid_windows[:64]
    assert perplexity(loaded, subset, progress=False).ppl == perplexity(model, subset, progress=False).ppl
    assert tokenizer("Once upon a time").input_ids == float_model[1]("Once upon a time").input_ids


def test_overwrite_keeps_a_complete_directory(rtn_models, float_model, tmp_path):
    save_quantized(rtn_models[4], float_model[1], tmp_path / "q", {"quantizer": {"bits": 4}})
    save_quantized(rtn_models[3], float_model[1], tmp_path / "q", {"quantizer": {"bits": 3}})
    assert json.loads((tmp_path / "q" / "modulora.json").read_text())["quantizer"]["bits"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # no staging or retired leftovers
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("keep me")
    with pytest.raises(EngineError, match="not a quantized model directory; refusing"):
        save_quantized(rtn_models[3], float_model[1], tmp_path / "plain", {})
    assert (tmp_path / "plain" / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda d: (d / "outside.safetensors").write_bytes((d / "outside.safetensors").read_bytes()[:-100]), "truncated"),
        (lambda d: _flip_byte(d / "blocks" / "block_00003.safetensors"), "checksum mismatch"),
        (lambda d: (d / "blocks" / "block_00001.safetensors").unlink(), "missing"),
        (lambda d: (d / "config.json").unlink(), "missing"),
        (lambda d: (d / "modulora.json").write_text("{not json"), "corrupt manifest"),
        (lambda d: (d / "modulora.json").unlink(), "not a quantized model directory"),
    ],
)
def test_damaged_directory_is_refused(rtn_models, float_model, tmp_path, damage, message):
    save_quantized(rtn_models[4], float_model[1], tmp_path / "q", {})
    damage(tmp_path / "q")
    with pytest.raises(EngineError, match=message) as info:
        load_quantized(tmp_path / "q")
    assert "\n" not in str(info.value)


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_quantization_error_shrinks_with_bits(float_model):
    w = float_model[0].model.layers[0].mlp.down_proj.weight
    errors = [(RTNQuantizer(bits=b, group_size=32).quantize(w).dequantize() - w).norm().item() for b in (2, 3, 4, 8)]
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < 0.01 * w.norm().item() and math.isfinite(errors[0])
