"""Quantizing a model with calibration data: the one entry point for Hessian-based quantizers.

Calibration text is a set of windows of ``seq_len`` tokens at seeded random
offsets in a tokenized file (as the OPTQ reference samples its calibration
set).  Two modes:

* ``sequential`` (default; the OPTQ paper's protocol, see
  :mod:`engine.model.sequential`): block by block, every layer calibrated on
  the output of the already quantized layers before it.
* ``independent``: all layers' statistics from one pass of the float model
  (:func:`engine.model.stats.collect_stats`), so they can be collected in
  shards, merged, saved, and layers quantized in any order.

Typical use::

    quantizer = make_quantizer("optq", bits=3, group_size=32, act_order=True)
    info = quantize_with_calibration(model, tokenizer, quantizer, "train.txt")
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from engine.errors import EngineError
from engine.eval.perplexity import read_text
from engine.model.quantize import target_linear_names
from engine.model.sequential import ShardRunner, Wrap, quantize_sequential, sum_in_order
from engine.model.stats import SHARD_WINDOWS
from engine.quant.base import Quantizer
from engine.storage import sha256_file

MODES = ("sequential", "independent")
# (model, windows, batch_size, asymmetric, shard_windows) -> a runner of calibration shards
RunnerFactory = Callable[[nn.Module, torch.Tensor, int, bool, int], ShardRunner]


def calibration_windows(
    tokenizer: PreTrainedTokenizerBase, text: str, n_windows: int = 128, seq_len: int = 256, seed: int = 0
) -> torch.Tensor:
    """``[n_windows, seq_len]`` token ids: windows of the tokenized ``text`` at seeded random offsets."""
    if n_windows < 1 or seq_len < 2:
        raise EngineError(f"need at least 1 calibration window of at least 2 tokens, got {n_windows} x {seq_len}")
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    if len(ids) < seq_len:
        raise EngineError(f"calibration text has {len(ids)} tokens, fewer than one window of {seq_len}")
    starts = torch.randint(0, len(ids) - seq_len + 1, (n_windows,), generator=torch.Generator().manual_seed(seed))
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def quantize_calibrated(
    model: nn.Module,
    quantizer: Quantizer,
    windows: torch.Tensor,
    mode: str = "sequential",
    names: list[str] | None = None,
    batch_size: int = 8,
    wrap: Wrap | None = None,
    asym_alpha: float = 0.0,
    shard_windows: int = SHARD_WINDOWS,
    runner_factory: RunnerFactory = ShardRunner,
) -> list[str]:
    """Quantize ``names`` (default: all decoder linears) in place, calibrated on token ``windows``.

    ``asym_alpha`` (sequential mode only) pulls each layer towards the float
    model's output; see :mod:`engine.model.sequential`.  The statistics are
    summed over shards of ``shard_windows`` windows; ``runner_factory`` decides
    where the shards run (this process by default; ``cluster.calibrate`` runs
    them on Ray workers, with the same result).
    """
    if mode not in MODES:
        raise EngineError(f"unknown calibration mode {mode!r}; allowed: {', '.join(MODES)}")
    if asym_alpha and mode != "sequential":
        raise EngineError("asymmetric calibration needs the sequential calibration mode")
    runner = runner_factory(model, windows, batch_size, asym_alpha > 0, shard_windows)
    if mode == "sequential":
        return quantize_sequential(model, quantizer, runner, names, wrap, asym_alpha)
    names = names if names is not None else target_linear_names(model)
    return runner.quantize(model, quantizer, names, sum_in_order(runner.call("stats", names)), wrap)


def quantize_with_calibration(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    quantizer: Quantizer,
    calib_file: str | Path,
    n_windows: int = 128,
    seq_len: int = 256,
    seed: int = 0,
    mode: str = "sequential",
    *,
    asym_alpha: float = 0.0,
    names: list[str] | None = None,
    batch_size: int = 8,
    wrap: Wrap | None = None,
    runner_factory: RunnerFactory = ShardRunner,
) -> dict[str, Any]:
    """Quantize ``model`` in place, calibrated on ``n_windows`` random windows of the text file ``calib_file``.

    Works for any quantizer (one without ``needs_calibration`` ignores the
    statistics).  Returns the calibration settings, for the model's manifest.
    """
    path = Path(calib_file)
    windows = calibration_windows(tokenizer, read_text(path), n_windows, seq_len, seed)
    quantize_calibrated(model, quantizer, windows, mode, names, batch_size, wrap, asym_alpha, runner_factory=runner_factory)
    return {
        "file": str(path.resolve()),
        "sha256": sha256_file(path),
        "windows": n_windows,
        "seq_len": seq_len,
        "seed": seed,
        "mode": mode,
        "asym_alpha": asym_alpha,
    }
