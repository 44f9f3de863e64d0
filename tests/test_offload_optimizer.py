"""Optimizer-state offload: host float32 masters + DeepSpeed CPU Adam, exact against plain CPU Adam and on resume."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import GGUF_MODEL, TRAIN_TXT
from engine.cli import cli
from engine.data import FormatSpec, build_examples
from engine.errors import EngineError
from engine.offload import HostOffloadedAdam
from engine.model import adapter_state, add_lora, lora_layers
from engine.pipelines import DataSpec, FinetuneSpec, OffloadSpec, TrainSpec
from engine.train import Trainer


@pytest.fixture(scope="module")
def windows(float_model):
    return build_examples(TRAIN_TXT, FormatSpec("text"), float_model[1], 64, limit=16)


def lora_model(q3: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The quantized model with the same seeded adapters every call, stored in ``dtype``."""
    model = copy.deepcopy(q3)
    add_lora(model, 4, 8, seed=5)
    for layer in lora_layers(model).values():
        layer.lora_a = nn.Parameter(layer.lora_a.detach().to(dtype))
        layer.lora_b = nn.Parameter(layer.lora_b.detach().to(dtype))
    return model


def config(**overrides) -> TrainSpec:
    return TrainSpec(**{"steps": 4, "batch_size": 2, "lr": 3e-3, "warmup_steps": 0, "save_every": 0,
                        "weight_decay": 0.01, "optimizer": "cpu_adam", **overrides})


def test_offload_on_cpu_equals_plain_cpu_adam(q3, windows, tmp_path):
    results = {}
    for offload in (False, True):
        model = lora_model(q3)
        trainer = Trainer(model, windows, config(steps=3), tmp_path / str(offload), 0, host_optimizer=offload)
        trainer.train()
        assert isinstance(trainer.optimizer, HostOffloadedAdam) == offload
        results[offload] = adapter_state(model)
    assert any(v.abs().max() > 0 for k, v in results[True].items() if k.endswith("lora_b"))  # B starts at zero
    assert all(torch.equal(results[True][k], v) for k, v in results[False].items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_resume_is_bit_identical(q3, windows, tmp_path, dtype):
    straight = lora_model(q3, dtype)
    trainer = Trainer(straight, windows, config(save_every=2), tmp_path / "straight", 0, host_optimizer=True)
    trainer.train()
    optimizer = trainer.optimizer
    assert all(torch.equal(m.to(dtype), p) for m, p in zip(optimizer.masters, optimizer.params))
    midway = "checkpoints/step-000002"
    saved = load_file(tmp_path / "straight" / midway / "optimizer.safetensors")
    # float32 params hold the masters exactly, so the checkpoint is a plain cpu_adam one; bfloat16 ones do not.
    assert any(k.endswith(".master") for k in saved) == (dtype != torch.float32)
    shutil.copytree(tmp_path / "straight" / midway, tmp_path / "resumed" / midway)
    resumed = lora_model(q3, dtype)
    Trainer(resumed, windows, config(save_every=2), tmp_path / "resumed", 0, host_optimizer=True).train(resume=True)
    expected = adapter_state(straight)
    assert all(torch.equal(v, expected[k]) for k, v in adapter_state(resumed).items())


def test_bfloat16_params_are_the_rounding_of_float32_masters():
    """Against DeepSpeed CPU Adam stepping float32 copies directly: the masters match it exactly."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    params = [nn.Parameter(torch.randn(8, 16).to(torch.bfloat16)) for _ in range(2)]
    reference = [p.detach().float() for p in params]
    optimizer = HostOffloadedAdam(params, lr=1e-2, weight_decay=0.01)
    reference_optimizer = DeepSpeedCPUAdam(reference, lr=1e-2, weight_decay=0.01, adamw_mode=True)
    for _ in range(3):
        for param, ref in zip(params, reference):
            param.grad = torch.randn_like(param)
            ref.grad = param.grad.float()
        optimizer.step()
        reference_optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        assert all(p.grad is None and m.grad is None for p, m in zip(params, optimizer.masters))
        for param, master, ref in zip(params, optimizer.masters, reference):
            assert master.dtype == torch.float32 and torch.equal(master, ref)
            assert param.dtype == torch.bfloat16 and torch.equal(param, ref.to(torch.bfloat16))
    assert any(not torch.equal(m, p.float()) for m, p in zip(optimizer.masters, params))  # bits bf16 cannot hold


def test_offload_needs_cpu_adam(tmp_path):
    data = DataSpec(file=str(TRAIN_TXT))
    with pytest.raises(EngineError, match="cpu_adam"):
        FinetuneSpec(model=str(GGUF_MODEL), data=data, out=str(tmp_path), offload=OffloadSpec(optimizer=True))
    FinetuneSpec(model=str(GGUF_MODEL), data=data, out=str(tmp_path), offload=OffloadSpec(optimizer=True),
                 train=TrainSpec(optimizer="cpu_adam"))
    # The CLI flag reaches the finetune's spec, which refuses it before any model is loaded.
    args = ["finetune", str(GGUF_MODEL), "--data", str(TRAIN_TXT), "--out", str(tmp_path), "--offload-optimizer"]
    with pytest.raises(EngineError, match="cpu_adam"):
        cli.main(args=args, standalone_mode=False)
