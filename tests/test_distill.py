"""Distillation of a quantized model's continuous parameters (``quantize --distill-steps``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import GGUF_MODEL, TRAIN_TXT, directory_tensors, layer_stats
from engine.errors import EngineError
from engine.model import load_model
from engine.pipelines import CalibSpec, QuantizeSpec, quantize
from engine.quant import make_quantizer


@pytest.mark.parametrize("method, settings", [
    ("quip", {"bits": 2}), ("optq", {"bits": 3, "group_size": 32, "act_order": True}), ("rtn", {"bits": 4}),
])
def test_a_row_gain_multiplies_exactly_its_row(method, settings):
    """Folding a gain into the stored scales multiplies each dequantized row by its gain (up to the float16
    rounding of the scales), on a ragged shape."""
    weight = torch.randn(37, 72, dtype=torch.float64)
    quantizer = make_quantizer(method, **settings)
    qweight = quantizer.quantize(weight, layer_stats(72) if quantizer.needs_calibration else None)
    assert qweight.has_row_scales
    before = qweight.dequantize(torch.float64)
    gain = torch.linspace(0.5, 1.5, 37, dtype=torch.float64)
    qweight.scale_rows(gain.float())
    expected = before * gain[:, None]
    assert torch.allclose(qweight.dequantize(torch.float64), expected, rtol=2e-3, atol=1e-6)


def test_a_format_with_one_scale_per_layer_refuses_row_gains():
    qweight = make_quantizer("quip", bits=2, incoherence="both").quantize(torch.randn(16, 32), layer_stats(32))
    assert not qweight.has_row_scales
    with pytest.raises(EngineError, match="no per-row scales"):
        qweight.scale_rows(torch.ones(16))


def _kl_to_float(float_model, directory, windows) -> float:
    """Mean per-token KL(float || quantized) on held-out windows, in float64 (computed here, not by the engine)."""
    model = load_model(directory)[0]
    with torch.no_grad():
        t = float_model(input_ids=windows).logits.double().log_softmax(-1)
        s = model(input_ids=windows).logits.double().log_softmax(-1)
    return float((t.exp() * (t - s)).sum(-1).mean())


@pytest.fixture(scope="module")
def quip2_dirs(tmp_path_factory):
    """A 2-bit QuIP# directory rounded only, and the same distilled 30 steps: ``(rounded, distilled, manifest)``."""
    root = tmp_path_factory.mktemp("distill")

    def run(out, steps):
        calib = CalibSpec(file=str(TRAIN_TXT), windows=64, seq_len=128, distill_steps=steps, distill_batch=8,
                          distill_windows=96)
        return quantize(QuantizeSpec(model=str(GGUF_MODEL), out=str(out), method="quip", options={"bits": 2},
                                     calib=calib))

    run(root / "rounded", 0)
    return root / "rounded", root / "distilled", run(root / "distilled", 30)


def test_distillation_brings_the_quantized_model_to_the_float_one_and_keeps_the_codes(float_model, valid_windows,
                                                                                        quip2_dirs):
    """Through the quantize use case: the distilled directory is closer to the float model on held-out text than
    the rounded one, its codes and sign vectors are the rounded one's bit for bit, and its manifest says what ran
    (on 96 windows of its own draw, not the 64 calibration windows)."""
    rounded_dir, distilled_dir, manifest = quip2_dirs
    record = manifest["distillation"]
    assert record["steps"] == 30 and record["windows"] == 96 and record["layers_with_row_gains"] == 35
    assert record["last_kl"] < record["first_kl"]
    held_out = valid_windows[:16, :128]
    rounded, distilled = (_kl_to_float(float_model[0], d, held_out) for d in (rounded_dir, distilled_dir))
    assert distilled < 0.9 * rounded, (rounded, distilled)
    a, b = directory_tensors(rounded_dir), directory_tensors(distilled_dir)
    packed = [k for k in a if k.split(":")[1].split(".")[-1].startswith(("codes", "signs"))]
    assert packed and all(torch.equal(a[k], b[k]) for k in packed)
    assert any(not torch.equal(a[k], b[k]) for k in a if k.endswith(".scale"))


def test_folding_the_gains_keeps_the_layer_s_output_bias_included():
    """What the model computed with the gains applied (forward hooks) is what it computes after they are folded
    into the scales (and the bias), up to the float16 rounding of the scales."""
    from torch import nn

    from engine.lora import ModuLoRALinear
    from engine.train.distill import row_gains

    qweight = make_quantizer("rtn", bits=4).quantize(torch.randn(24, 64), None)
    model = nn.Sequential(ModuLoRALinear(qweight, torch.randn(24)))
    x = torch.randn(5, 64)
    with row_gains(model) as gains, torch.no_grad():
        gains["0"].copy_(torch.linspace(0.6, 1.4, 24))
        hooked = model(x)
    assert (model(x) - hooked).norm() / hooked.norm() < 1e-3  # float16 scales: 2^-11 relative rounding
    assert not torch.allclose(hooked, nn.Sequential(ModuLoRALinear(
        make_quantizer("rtn", bits=4).quantize(torch.randn(24, 64), None)))(x))


def test_correcting_a_distilled_directory_keeps_its_base_and_starts_the_adapter_at_the_error_s_svd(
        float_model, quip2_dirs, tmp_path):
    """``modulora correct`` (LoftQ init) on a distilled directory: re-quantizing would throw the tuned scales away,
    so the corrected directory's blocks are the distilled ones bit for bit, and the adapter starts at the best
    rank-4 approximation of ``W - dequant(base)`` (numpy's float64 SVD; one step at a negligible rate)."""
    from safetensors.torch import load_file

    from engine.lora import ModuLoRALinear
    from engine.pipelines import CorrectSpec, correct
    from engine.train import TrainSpec

    _, distilled_dir, _ = quip2_dirs
    out = tmp_path / "corrected"
    correct(CorrectSpec(model=str(distilled_dir), calib=str(TRAIN_TXT), out=str(out), rank=4, limit=4, seq_len=64,
                        train=TrainSpec(steps=1, batch_size=2, lr=1e-12, warmup_steps=0)))
    before, after = directory_tensors(distilled_dir), directory_tensors(out)
    blocks = [k for k in before if k.startswith("blocks")]
    assert blocks and all(torch.equal(before[k], after[k]) for k in blocks)

    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    student = load_model(distilled_dir)[0]
    checked = 0
    for name, layer in student.named_modules():
        if not isinstance(layer, ModuLoRALinear):
            continue
        a, b = (next(v for k, v in adapter.items() if f"{name}.lora_{x}" in k).double() for x in "AB")
        residual = float_model[0].get_submodule(name).weight.double() - layer.base.dequantize(torch.float64)
        u, s, vh = np.linalg.svd(residual.numpy(), full_matrices=False)
        best = torch.from_numpy((u[:, :4] * s[:4]) @ vh[:4])
        fitted = 2.0 * b @ a  # alpha 2 x rank over rank
        assert (fitted - best).norm() <= 1e-4 * best.norm(), name
        checked += 1
    assert checked == 35
