"""Device hygiene on the CPU: run GPU-bound code on ``meta`` tensors and catch any tensor made elsewhere.

A tensor created without the device of its inputs (``torch.arange(n)`` inside a
kernel) lands on the CPU; on a GPU that is a device mismatch or a silent copy.
Running each format's decoding with every input on ``meta`` under a dispatch
mode that records the device of every op's outputs finds those places without
a GPU (the QuIP# E8P decoder had one).  The same probe runs a streamed training
step (device and host tiers), the vocabulary-tiled loss, the backward and
evaluation's forward; the disk tier's blocks are checked to arrive on the device
(its reads are staged in host memory by design).  The trainer itself moves
batches with ``.to(device)`` and is run on a GPU by ``tests/test_cuda.py``.

Calibrated quantization (forward passes, statistics, Hessian solves, Viterbi
searches) is data-dependent, so it cannot run on ``meta``; it runs on the CPU
with ``meta`` as the *default* device instead: a tensor made without naming a
device is then ``meta`` and fails the first operation that meets the model's.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from conftest import QUANT_FORMATS, layer_stats
from engine.model import place
from engine.quant import make_quantizer


class DeviceProbe(TorchDispatchMode):
    """Records every op whose outputs include a tensor off the ``meta`` device."""

    def __init__(self) -> None:
        super().__init__()
        self.strays: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor) and not value.is_meta:
                self.strays.append(f"{func} -> {value.device}")
        return out


@pytest.fixture(scope="module")
def weight(float_model):
    return float_model[0].model.layers[2].mlp.down_proj.weight.detach().clone()


@pytest.mark.parametrize(("method", "settings"), QUANT_FORMATS, ids=lambda v: str(v))
def test_decoding_creates_nothing_off_the_inputs_device(weight, method, settings):
    quantizer = make_quantizer(method, **settings)
    qweight = quantizer.quantize(weight, layer_stats(weight.shape[1]) if quantizer.needs_calibration else None)
    on_meta = place(copy.deepcopy(qweight), "meta")
    probe = DeviceProbe()
    with probe:
        for dtype in (torch.float32, torch.bfloat16):
            dense = on_meta.dequantize(dtype)
            tile = on_meta.dequantize(dtype, rows=(3, 40))
            assert dense.is_meta and dense.shape == qweight.shape and tile.shape == (37, weight.shape[1])
            if on_meta.column_granule is not None:
                assert on_meta.dequantize(dtype, cols=(0, on_meta.column_granule)).is_meta
    assert probe.strays == []


CALIBRATED = [("optq", {"bits": 3, "group_size": 32, "act_order": True}), ("quip", {"bits": 3, "tune_iters": 0}),
              ("qtip", {"bits": 2, "tune_iters": 0})]


@pytest.mark.parametrize(("method", "settings"), CALIBRATED, ids=lambda v: str(v))
def test_calibrated_quantization_names_the_device_of_everything_it_makes(float_model, method, settings):
    """Sequential, asymmetric calibration of the shared model's first two blocks with ``meta`` as the default
    device: it runs, and gives the bits of a run without the probe (two shards: their statistics are merged too).
    It fails with a ``torch.zeros`` in the statistics' sum that names no device."""
    from engine.data import calibration_windows, read_text
    from engine.model import quantize_calibrated, target_linear_names

    from conftest import TRAIN_TXT

    windows = calibration_windows(float_model[1], read_text(TRAIN_TXT), 4, 64, 0)
    names = [n for n in target_linear_names(float_model[0]) if n.startswith(("model.layers.0.", "model.layers.1."))]
    results = []
    for probe in (False, True):
        model = copy.deepcopy(float_model[0])
        quantizer = make_quantizer(method, **settings)
        with torch.device("meta") if probe else contextlib.nullcontext():
            quantize_calibrated(model, quantizer, windows, mode="sequential", asym_alpha=0.5, names=names,
                                batch_size=2, shard_windows=2)
        results.append(model.state_dict())
    assert results[0].keys() == results[1].keys()
    for key, tensor in results[1].items():
        assert not tensor.is_meta and torch.equal(tensor, results[0][key]), key


def test_the_probe_sees_a_tensor_made_on_the_cpu():
    """The probe itself: a factory op without a device is caught."""
    probe = DeviceProbe()
    with probe:
        torch.arange(3)
    assert probe.strays


@pytest.fixture(scope="module")
def q3_small(float_model):
    from engine.model import quantize_model
    from engine.quant import RTNQuantizer

    model = copy.deepcopy(float_model[0])
    quantize_model(model, RTNQuantizer(bits=3, group_size=32))
    return model


@pytest.mark.parametrize("tier", ["device", "host"])
def test_streamed_step_and_forward_create_nothing_off_the_device(q3_small, tmp_path, tier):
    """A training step as the trainer takes it (blocks streamed from each tier, the loss over vocabulary tiles,
    the backward) and evaluation's forward, with the model placed on ``meta``."""
    import torch.fx.experimental._config as fx_config

    from engine.model import add_lora
    from engine.offload import BlockStreamer, make_store
    from engine.train.losses import chunked_causal_lm_loss

    model = copy.deepcopy(q3_small)
    add_lora(model, 4, 8, seed=0)
    streamer = BlockStreamer(model, make_store(tier, "meta", directory=tmp_path / "blocks"), prefetch=1)
    place(model, "meta")
    ids = torch.zeros(2, 16, dtype=torch.long, device="meta")
    probe = DeviceProbe()
    with probe, fx_config.patch(meta_nonzero_assume_all_nonzero=True):  # the loss keeps the unmasked targets
        chunked_causal_lm_loss(model, {"input_ids": ids, "labels": ids}).backward()
        with torch.no_grad():
            logits = model(input_ids=ids).logits
    streamer.close()
    assert logits.is_meta and logits.shape == (2, 16, model.config.vocab_size)
    assert all(p.grad is not None and p.grad.is_meta for p in model.parameters() if p.requires_grad)
    assert probe.strays == []


def test_disk_store_hands_out_blocks_on_its_device(q3_small, tmp_path):
    """The disk tier stages each read in host memory (by design: the file's bytes land there), then hands the
    block out on the compute device; the check the probe cannot make for it (the staging is host work)."""
    from engine.offload import DiskStore
    from engine.offload.streamer import packed_weights

    from engine.model import decoder_blocks

    store = DiskStore(tmp_path / "blocks", "meta")
    _, tensors = packed_weights(decoder_blocks(q3_small)[0])
    store.put(0, tensors)
    fetched = store.ready(0, store.fetch(0))
    assert fetched.keys() == tensors.keys() and all(t.is_meta for t in fetched.values())
