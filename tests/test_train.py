"""Trainer: exact resume after SIGKILL, corrupt-checkpoint fallback, dynamic rank, LREC."""

from __future__ import annotations

import copy
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import GGUF_MODEL, TRAIN_TXT
from engine.data import FormatSpec, build_examples
from engine.data import calibration_windows, read_text
from engine.eval import perplexity
from engine.model import adapter_state, add_lora, collect_stats, quantize_model, set_active_rank
from engine.quant import OPTQQuantizer, RTNQuantizer
from engine.train import Trainer, TrainSpec
from engine.train.checkpoint import checkpoint_dirs, latest_good_checkpoint
from engine.train.lrec import distillation_loss, loftq_layer

FINETUNE = [sys.executable, "-m", "engine.cli", "finetune", str(GGUF_MODEL), "--data", str(TRAIN_TXT),
            "--seq-len", "64", "--limit", "48", "--batch-size", "4", "--steps", "14", "--save-every", "1",
            "--keep-last", "3", "--rank-max", "4", "--dynamic", "--lr", "3e-3"]


def run_finetune(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([*FINETUNE, "--out", str(out), *extra], capture_output=True, text=True)


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(tmp_path):
    reference = run_finetune(tmp_path / "straight")
    assert reference.returncode == 0, reference.stderr
    kill_at = random.Random(os.getpid()).randint(3, 10)
    proc = subprocess.Popen([*FINETUNE, "--out", str(tmp_path / "killed")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        done = [int(p.name.split("-")[1]) for p in checkpoint_dirs(tmp_path / "killed" / "checkpoints")]
        if done and max(done) >= kill_at:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "adapter").exists()
    resumed = run_finetune(tmp_path / "killed", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "killed" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def train_windows(float_model):
    return build_examples(TRAIN_TXT, FormatSpec("text"), float_model[1], 128, limit=64)


def test_corrupt_latest_checkpoint_falls_back(q3, train_windows, tmp_path):
    model = copy.deepcopy(q3)
    add_lora(model, 4, 8, seed=0)
    Trainer(model, train_windows, TrainSpec(steps=4, batch_size=2, save_every=1, keep_last=3), tmp_path, 0).train()
    newest = checkpoint_dirs(tmp_path / "checkpoints")[-1]
    weights = newest / "adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    checkpoint = latest_good_checkpoint(tmp_path / "checkpoints")
    assert checkpoint is not None and checkpoint.state["step"] == 3


def test_non_finite_loss_stops_before_the_update_and_keeps_the_checkpoints(q3, train_windows, tmp_path):
    """Two good steps, then a loss that turns NaN: training stops at step 3 with one clear error, the adapter is
    the step-2 one (no update from the NaN gradients), the checkpoints and the metrics log end at step 2."""
    from engine.errors import EngineError
    from engine.train.losses import chunked_causal_lm_loss

    model = copy.deepcopy(q3)
    add_lora(model, 4, 8, seed=0)
    config = TrainSpec(steps=2, batch_size=2, save_every=1, warmup_steps=0)
    Trainer(model, train_windows, config, tmp_path, 0).train()
    good = {k: v.clone() for k, v in adapter_state(model).items()}

    def poisoned(model_: torch.nn.Module, batch: dict) -> torch.Tensor:
        return chunked_causal_lm_loss(model_, batch) * float("nan")

    trainer = Trainer(model, train_windows, TrainSpec(steps=4, batch_size=2, save_every=1, warmup_steps=0), tmp_path, 0,
                      loss_fn=poisoned)
    with pytest.raises(EngineError, match=r"step 3: non-finite loss \(nan\)"):
        trainer.train(resume=True)
    assert all(torch.equal(v, good[k]) for k, v in adapter_state(model).items())
    assert [d.name for d in checkpoint_dirs(tmp_path / "checkpoints")][-1].endswith("2")
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


def test_a_torn_last_metrics_line_does_not_block_resume(q3, train_windows, tmp_path):
    """A kill mid-write leaves half a line at the end of metrics.jsonl; resuming drops it and logs on."""
    model = copy.deepcopy(q3)
    add_lora(model, 4, 8, seed=0)
    Trainer(model, train_windows, TrainSpec(steps=2, batch_size=2, save_every=1, warmup_steps=0), tmp_path, 0).train()
    with open(tmp_path / "metrics.jsonl", "a") as log:
        log.write('{"step": 3, "lo')
    Trainer(model, train_windows, TrainSpec(steps=3, batch_size=2, save_every=1, warmup_steps=0), tmp_path, 0).train(
        resume=True)
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_resuming_a_finished_run_reports_its_last_step(q3, train_windows, tmp_path):
    """Nothing is left to train: the result is the last logged step's metrics (it used to be ``{}``)."""
    model = copy.deepcopy(q3)
    add_lora(model, 4, 8, seed=0)
    config = TrainSpec(steps=2, batch_size=2, save_every=1, warmup_steps=0)
    final = Trainer(model, train_windows, config, tmp_path, 0).train()
    again = Trainer(model, train_windows, config, tmp_path, 0).train(resume=True)
    assert again == final and again["loss"] > 0
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


def test_dynamic_rank_trains_every_prefix(q3, train_windows, valid_windows, tmp_path):
    model = copy.deepcopy(q3)
    add_lora(model, 8, 16, seed=1)
    before = {r: perplexity(_at_rank(model, r), valid_windows[:32], progress=False).ppl for r in (1, 8)}
    config = TrainSpec(steps=30, batch_size=4, lr=3e-3, warmup_steps=0, seed=3)
    Trainer(model, train_windows, config, tmp_path, 0, rank_max=8).train()
    after = {r: perplexity(_at_rank(model, r), valid_windows[:32], progress=False).ppl for r in (1, 8)}
    assert after[1] < before[1] and after[8] < before[8]
    log = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len({line.split('"rank": ')[1].split(",")[0] for line in log}) > 3  # ranks were sampled


def _at_rank(model, rank):
    set_active_rank(model, rank)
    return model


def test_frozen_variant_updates_only_the_sampled_component(q3, train_windows, tmp_path):
    model = copy.deepcopy(q3)
    add_lora(model, 4, 8, seed=0)
    set_active_rank(model, 3, train_last_only=True)
    with torch.no_grad():
        for layer in model.modules():
            if getattr(layer, "lora_b", None) is not None:
                layer.lora_b.normal_(0, 0.01)
    before = adapter_state(model)
    batch = {"input_ids": torch.tensor([train_windows[0].input_ids])}
    model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss.backward()
    for name, param in model.named_parameters():
        if name.endswith("lora_a"):
            assert param.grad[:2].abs().max() == 0 and param.grad[2].abs().max() > 0 and param.grad[3:].abs().max() == 0
    assert all(torch.equal(before[k], v) for k, v in adapter_state(model).items())


def test_loftq_layer_reduces_error_against_plain_quantization(float_model):
    weight = float_model[0].model.layers[1].mlp.down_proj.weight
    quantizer = RTNQuantizer(bits=2, group_size=32)
    plain = (quantizer.quantize(weight).dequantize() - weight).norm()
    qweight, a, b = loftq_layer(weight, quantizer, rank=8, scaling=2.0, iters=4)
    corrected = (qweight.dequantize() + 2.0 * b @ a - weight).norm()
    assert corrected < 0.8 * plain


def test_loftq_with_a_calibrated_quantizer_lowers_the_weighted_error(float_model):
    """``modulora correct --init loftq`` on an OPTQ directory re-quantizes with the teacher's input statistics."""
    model, tokenizer = float_model
    name = "model.layers.1.mlp.down_proj"
    windows = calibration_windows(tokenizer, read_text(TRAIN_TXT), n_windows=16, seq_len=256, seed=0)
    stats = collect_stats(model, windows, [name])[name]
    weight, hessian = model.get_submodule(name).weight, stats.hessian.double()
    quantizer = OPTQQuantizer(bits=2)

    def weighted_error(approx: torch.Tensor) -> float:
        error = approx.double() - weight.double()
        return torch.trace(error @ hessian @ error.T).item()

    plain = weighted_error(quantizer.quantize(weight, stats).dequantize())
    qweight, a, b = loftq_layer(weight, quantizer, rank=8, scaling=2.0, iters=4, stats=stats)
    assert weighted_error(qweight.dequantize() + 2.0 * b @ a) < 0.8 * plain


def test_lrec_closes_most_of_the_gap(float_model, valid_windows, tmp_path):
    teacher = float_model[0]
    student = copy.deepcopy(teacher)
    quantize_model(student, RTNQuantizer(bits=3, group_size=32))
    add_lora(student, 4, 8, seed=0)
    subset = valid_windows[:32]
    ppl_float = perplexity(teacher, subset, progress=False).ppl
    ppl_before = perplexity(student, subset, progress=False).ppl
    windows = build_examples(TRAIN_TXT, FormatSpec("text"), float_model[1], 256, limit=256)
    config = TrainSpec(steps=40, batch_size=8, lr=3e-3, warmup_steps=5, save_every=0)
    Trainer(student, windows, config, tmp_path, 0, loss_fn=distillation_loss(teacher, ce_weight=1.0)).train()
    ppl_after = perplexity(student, subset, progress=False).ppl
    closed = (torch.log(torch.tensor(ppl_before / ppl_after)) / torch.log(torch.tensor(ppl_before / ppl_float))).item()
    assert closed > 0.7, (ppl_float, ppl_before, ppl_after)


def test_deepspeed_cpu_adam_matches_torch_adamw_and_resumes(q3, train_windows, tmp_path):
    """DeepSpeed's CPU Adam (compiled on first use, then cached) against torch's AdamW as the reference."""
    results = {}
    for name in ("adamw", "cpu_adam"):
        model = copy.deepcopy(q3)
        add_lora(model, 4, 8, seed=5)
        initial = adapter_state(model)
        config = TrainSpec(steps=4, batch_size=2, lr=3e-3, warmup_steps=0, weight_decay=0.01, optimizer=name, save_every=2)
        Trainer(model, train_windows, config, tmp_path / name, 0).train()
        results[name] = adapter_state(model)
    for key, value in results["adamw"].items():
        moved = (value - initial[key]).abs().max()
        diff = (results["cpu_adam"][key] - value).abs()
        # Same algorithm, different float32 arithmetic: the bulk agrees to ~1e-8.  Elements whose gradients are
        # near eps (A's gradient is exactly 0 at step 1, while B = 0) see m / (sqrt(v) + eps) of two slightly
        # different gradient sequences, which may differ by a few percent of one step.
        assert diff.max() < 0.05 * 3e-3 and diff.mean() < 1e-4 * moved, key
    resumed = copy.deepcopy(q3)
    add_lora(resumed, 4, 8, seed=5)
    config = TrainSpec(steps=4, batch_size=2, lr=3e-3, warmup_steps=0, weight_decay=0.01, optimizer="cpu_adam", save_every=2)
    (tmp_path / "cpu_adam" / "checkpoints" / "step-000004").rename(tmp_path / "cpu_adam" / "step-4-aside")
    Trainer(resumed, train_windows, config, tmp_path / "cpu_adam", 0).train(resume=True)
    assert all(torch.equal(v, results["cpu_adam"][k]) for k, v in adapter_state(resumed).items())


def test_gradient_checkpointing_gives_the_same_updates(q3, train_windows, tmp_path):
    results = []
    for checkpointing in (False, True):
        model = copy.deepcopy(q3)
        add_lora(model, 4, 8, seed=2)
        config = TrainSpec(steps=3, batch_size=2, lr=3e-3, warmup_steps=0, save_every=0, grad_checkpointing=checkpointing)
        Trainer(model, train_windows, config, tmp_path / str(checkpointing), 0).train()
        results.append(adapter_state(model))
        assert model.is_gradient_checkpointing == checkpointing
    assert all(torch.allclose(results[0][k], results[1][k], atol=1e-6) for k in results[0])


def test_bfloat16_compute_trains(q3, train_windows, valid_windows, tmp_path):
    model = copy.deepcopy(q3)
    add_lora(model, 4, 8, seed=2)
    for layer in model.modules():
        if hasattr(layer, "compute_dtype"):
            layer.compute_dtype = torch.bfloat16
    before = perplexity(model, valid_windows[:16], progress=False).ppl
    Trainer(model, train_windows, TrainSpec(steps=15, batch_size=4, lr=3e-3, warmup_steps=0, save_every=0), tmp_path, 0).train()
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    assert perplexity(model, valid_windows[:16], progress=False).ppl < before
