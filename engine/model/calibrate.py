"""Calibration: per-layer input statistics from a text sample, and quantizing a model with them.

Hessian-based quantizers (OPTQ, QuIP#) need, for every linear layer, the sum
``X^T X`` of the inputs it sees on representative text (:class:`LayerStats`).
The text is a set of windows of ``seq_len`` tokens drawn at seeded random
offsets from a tokenized file (as the OPTQ reference samples its calibration
set).  Two ways to collect them:

* ``independent``: one pass of the float model over all windows, forward hooks
  on every layer.  Layers can then be quantized in any order or in parallel,
  and statistics from data shards merge by summation (:func:`merge_stats`).
* ``sequential`` (the OPTQ paper's protocol): decoder block by block, each
  block's layers see the output of the already *quantized* blocks before it;
  within a block, layers that share one input (q/k/v, gate/up) are quantized
  together and later layers (o, down) see the quantized earlier ones, so each
  layer compensates the error upstream of it.

Statistics files are safetensors (one float64 ``xtx`` per layer) with the row
counts as JSON in the header metadata.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from engine.errors import EngineError
from engine.eval.perplexity import read_text
from engine.model.quantize import decoder_blocks, quantize_model, target_linear_names
from engine.quant.base import LayerStats, QuantizedWeight, Quantizer
from engine.storage import atomic_save_safetensors, sha256_file

MODES = ("sequential", "independent")
STATS_FORMAT = "modulora-layer-stats"

Wrap = Callable[[QuantizedWeight, torch.Tensor | None], nn.Module]


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


@contextmanager
def recording_inputs(model: nn.Module, names: list[str]) -> Iterator[dict[str, LayerStats]]:
    """Forward pre-hooks that add every input row ``x`` of the named layers to ``xtx += x x^T`` (float64)."""
    stats: dict[str, LayerStats] = {}
    handles = []

    def hook(name: str, in_features: int) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        stats[name] = LayerStats(torch.zeros(in_features, in_features, dtype=torch.float64), 0)

        def record(_module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach().reshape(-1, in_features).to(device="cpu", dtype=torch.float64)
            stats[name].xtx.addmm_(x.T, x)
            stats[name].count += x.shape[0]

        return record

    for name in names:
        module = model.get_submodule(name)
        handles.append(module.register_forward_pre_hook(hook(name, module.in_features)))
    try:
        yield stats
    finally:
        for handle in handles:
            handle.remove()
    unused = [name for name, s in stats.items() if s.count == 0]
    if unused:
        raise EngineError(f"layers never ran during calibration: {', '.join(unused[:3])}")


@torch.no_grad()
def collect_stats(
    model: nn.Module, windows: torch.Tensor, names: list[str] | None = None, batch_size: int = 8
) -> dict[str, LayerStats]:
    """Statistics of every named layer (default: all decoder linears) from one pass of ``model``."""
    names = names if names is not None else target_linear_names(model)
    device = next(model.parameters()).device
    with recording_inputs(model, names) as stats:
        for start in range(0, len(windows), batch_size):
            model(input_ids=windows[start : start + batch_size].to(device), use_cache=False)
    return stats


def merge_stats(*shards: dict[str, LayerStats]) -> dict[str, LayerStats]:
    """Statistics of the union of data shards: per-layer sums."""
    if not shards:
        raise EngineError("no statistics to merge")
    merged = dict(shards[0])
    for shard in shards[1:]:
        if shard.keys() != merged.keys():
            raise EngineError(f"statistics shards cover different layers: {sorted(shard.keys() ^ merged.keys())[:3]}")
        for name, s in shard.items():
            if s.xtx.shape != merged[name].xtx.shape:
                raise EngineError(f"{name}: statistics shards disagree on shape ({tuple(s.xtx.shape)})")
            merged[name] = merged[name].merge(s)
    return merged


def save_stats(stats: dict[str, LayerStats], path: str | Path) -> None:
    """Write statistics (atomically) as safetensors; row counts go in the JSON header."""
    counts = {name: s.count for name, s in stats.items()}
    metadata = {"format": STATS_FORMAT, "counts": json.dumps(counts)}
    atomic_save_safetensors(path, {name: s.xtx for name, s in stats.items()}, metadata)


def load_stats(path: str | Path) -> dict[str, LayerStats]:
    """Inverse of :func:`save_stats`."""
    path = Path(path)
    if not path.is_file():
        raise EngineError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != STATS_FORMAT:
                raise EngineError(f"{path}: not a calibration statistics file")
            counts = json.loads(metadata["counts"])
            return {name: LayerStats(f.get_tensor(name), int(counts[name])) for name in f.keys()}
    except (SafetensorError, json.JSONDecodeError, KeyError) as exc:
        raise EngineError(f"{path}: unreadable statistics file ({exc})") from None


class _BlockInputsCaptured(Exception):
    """Raised by the hook on the first decoder block to stop the forward pass there."""


@torch.no_grad()
def _first_block_inputs(
    model: nn.Module, block: nn.Module, windows: torch.Tensor, batch_size: int
) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
    """Per batch, the positional and keyword arguments the model passes to its first block."""
    captured: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def capture(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        captured.append((args, kwargs))
        raise _BlockInputsCaptured

    device = next(model.parameters()).device
    handle = block.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        for start in range(0, len(windows), batch_size):
            try:
                model(input_ids=windows[start : start + batch_size].to(device), use_cache=False)
            except _BlockInputsCaptured:
                pass
    finally:
        handle.remove()
    return captured


def _run_block(block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    out = block(*args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _with_hidden(args: tuple[Any, ...], kwargs: dict[str, Any], hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


@torch.no_grad()
def _shared_input_groups(model: nn.Module, block: nn.Module, names: list[str], inputs: tuple) -> list[list[str]]:
    """``names`` grouped by the input tensor they consume, in the order the block calls them.

    For a Llama block: [q, k, v], [o], [gate, up], [down].
    """
    calls: list[tuple[str, torch.Tensor]] = []
    handles = [
        model.get_submodule(name).register_forward_pre_hook(lambda _m, a, name=name: calls.append((name, a[0])))
        for name in names
    ]
    try:
        _run_block(block, *inputs)
    finally:
        for handle in handles:
            handle.remove()
    groups: list[list[str]] = []
    previous: torch.Tensor | None = None
    seen: set[str] = set()
    for name, x in calls:
        if name in seen:
            continue
        if x is previous:
            groups[-1].append(name)
        else:
            groups.append([name])
        seen.add(name)
        previous = x
    missing = [n for n in names if n not in seen]
    if missing:
        raise EngineError(f"layers never ran during calibration: {', '.join(missing[:3])}")
    return groups


@torch.no_grad()
def quantize_sequential(
    model: nn.Module,
    quantizer: Quantizer,
    windows: torch.Tensor,
    names: list[str] | None = None,
    batch_size: int = 8,
    wrap: Wrap | None = None,
) -> list[str]:
    """Quantize block by block, each layer calibrated on the outputs of the quantized layers before it."""
    names = names if names is not None else target_linear_names(model)
    blocks = decoder_blocks(model)
    prefix = next(name for name, module in model.named_modules() if module is blocks)
    inputs = _first_block_inputs(model, blocks[0], windows, batch_size)
    done: list[str] = []
    for index, block in enumerate(tqdm(blocks, desc=f"calibrate ({quantizer.name})", unit="block", leave=False)):
        block_names = [n for n in names if n.startswith(f"{prefix}.{index}.")]
        for group in _shared_input_groups(model, block, block_names, inputs[0]) if block_names else []:
            with recording_inputs(model, group) as stats:
                for args, kwargs in inputs:
                    _run_block(block, args, kwargs)
            done += quantize_model(model, quantizer, group, stats, wrap)
        inputs = [_with_hidden(args, kwargs, _run_block(block, args, kwargs)) for args, kwargs in inputs]
    outside = sorted(set(names) - set(done))
    if outside:
        raise EngineError(f"layers outside the decoder blocks cannot be calibrated sequentially: {outside[:3]}")
    return done


def quantize_calibrated(
    model: nn.Module,
    quantizer: Quantizer,
    windows: torch.Tensor,
    mode: str = "sequential",
    names: list[str] | None = None,
    batch_size: int = 8,
    wrap: Wrap | None = None,
) -> list[str]:
    """Quantize ``names`` (default: all decoder linears) in place with statistics from token ``windows``."""
    if mode == "sequential":
        return quantize_sequential(model, quantizer, windows, names, batch_size, wrap)
    if mode == "independent":
        return quantize_model(model, quantizer, names, collect_stats(model, windows, names, batch_size), wrap)
    raise EngineError(f"unknown calibration mode {mode!r}; allowed: {', '.join(MODES)}")


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
    names: list[str] | None = None,
    batch_size: int = 8,
    wrap: Wrap | None = None,
) -> dict[str, Any]:
    """Quantize ``model`` in place, calibrated on ``n_windows`` random windows of ``calib_file``.

    Works for any quantizer (those without ``needs_calibration`` simply ignore
    the statistics).  Returns the calibration settings, for a model's manifest.
    """
    path = Path(calib_file)
    windows = calibration_windows(tokenizer, read_text(path), n_windows, seq_len, seed)
    quantize_calibrated(model, quantizer, windows, mode, names, batch_size, wrap)
    return {
        "file": str(path.resolve()),
        "sha256": sha256_file(path),
        "windows": n_windows,
        "seq_len": seq_len,
        "seed": seed,
        "mode": mode,
    }
