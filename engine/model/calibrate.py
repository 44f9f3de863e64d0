"""Quantizing a model with calibration data: the one entry point for Hessian-based quantizers.

Calibration data is a set of token windows (:func:`engine.data.calibration_windows`:
seeded random windows of a text file, as the OPTQ reference samples its
calibration set).  Two modes:

* ``sequential`` (the OPTQ paper's protocol, see
  :mod:`engine.model.sequential`): block by block, every layer calibrated on
  the output of the already quantized layers before it.
* ``independent``: every layer calibrated on the float model's inputs, also
  block by block (the statistics equal one pass of the float model,
  :func:`engine.model.stats.collect_stats`).

Typical use::

    windows = calibration_windows(tokenizer, read_text("train.txt"), 128, 256, seed=0)
    quantize_calibrated(model, make_quantizer("optq", bits=3), windows, mode="sequential", asym_alpha=0.5)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from engine.errors import EngineError
from engine.model.sequential import BlockLifecycle, ShardRunner, Wrap, quantize_blockwise
from engine.model.stats import SHARD_WINDOWS
from engine.quant.base import Quantizer

MODES = ("sequential", "independent")
# (model, windows, batch_size, asymmetric, shard_windows) -> a runner of calibration shards
RunnerFactory = Callable[[nn.Module, torch.Tensor, int, bool, int], ShardRunner]


def quantize_calibrated(
    model: nn.Module,
    quantizer: Quantizer,
    windows: torch.Tensor,
    *,
    mode: str,
    asym_alpha: float,
    names: list[str] | None = None,
    batch_size: int = 8,
    wrap: Wrap | None = None,
    shard_windows: int = SHARD_WINDOWS,
    runner_factory: RunnerFactory = ShardRunner,
    lifecycle: BlockLifecycle | None = None,
) -> list[str]:
    """Quantize ``names`` (default: all decoder linears) in place, calibrated on token ``windows``.

    ``asym_alpha`` (sequential mode only) pulls each layer towards the float
    model's output; see :mod:`engine.model.sequential`.  The statistics are
    summed over shards of ``shard_windows`` windows; ``runner_factory`` decides
    where the shards run (this process by default; ``cluster.calibrate`` runs
    them on Ray workers, with the same result).  ``lifecycle`` brings each
    block of a model built on ``meta`` in, and saves and releases it, so the
    model is never whole in memory.
    """
    if mode not in MODES:
        raise EngineError(f"unknown calibration mode {mode!r}; allowed: {', '.join(MODES)}")
    if asym_alpha and mode != "sequential":
        raise EngineError("asymmetric calibration needs the sequential calibration mode")
    runner = runner_factory(model, windows, batch_size, asym_alpha > 0, shard_windows)
    return quantize_blockwise(model, quantizer, runner, names, wrap, asym_alpha, mode == "sequential", lifecycle)
