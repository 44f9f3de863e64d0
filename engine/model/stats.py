"""Per-layer input statistics (:class:`LayerStats`): collected with forward hooks, merged, saved, loaded.

Hessian-based quantizers (OPTQ, QuIP#) need, for every linear layer, the sum
``X^T X`` of the inputs it sees on calibration text, summed on the device the
activations are on (the GPU, when calibration runs there).  The sums carry twice the
activations' precision (:func:`stats_dtype`: float64 for float32 activations,
float32 for bfloat16 ones, so a 7B model's ``11008 x 11008`` sums take 485 MB,
not 970), and shards are added in shard order (:func:`merge_stats`), so
collection can be split across workers with the same result.

Files are safetensors, one ``xtx`` tensor per layer, with the row counts as
JSON in the header metadata.
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

from engine.errors import EngineError
from engine.model.experts import routed_layers
from engine.model.quantize import in_features_of, target_linear_names
from engine.quant.base import LayerStats
from engine.storage import atomic_save_safetensors

STATS_FORMAT = "modulora-layer-stats"
SHARD_WINDOWS = 32  # calibration windows per statistics shard: the unit of data parallelism


def stats_dtype(activations: torch.dtype) -> torch.dtype:
    """Twice the activations' precision: float64 sums of float32 activations, float32 sums of 16-bit ones."""
    return torch.float64 if activations in (torch.float32, torch.float64) else torch.float32


def _rows(args: tuple[Any, ...], in_features: int) -> torch.Tensor:
    x = args[0].detach()
    return x.reshape(-1, in_features).to(dtype=stats_dtype(x.dtype))  # summed where the activations are


def _add(total: torch.Tensor | None, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``total + left^T right``, the sum made on first use in the rows' dtype and device."""
    if total is None or total.numel() == 0:
        total = torch.zeros(left.shape[1], right.shape[1], dtype=left.dtype, device=left.device)
    return total.addmm_(left.T, right)


@contextmanager
def recording_inputs(model: nn.Module, names: list[str]) -> Iterator[dict[str, LayerStats]]:
    """Forward pre-hooks that add every input row ``x`` of the named layers to ``xtx += x x^T``."""
    stats: dict[str, LayerStats] = {}
    handles = []

    def hook(name: str, in_features: int) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        stats[name] = LayerStats(torch.empty(0), 0)

        def record(_module: nn.Module, args: tuple[Any, ...]) -> None:
            x = _rows(args, in_features)
            stats[name].xtx = _add(stats[name].xtx, x, x)
            stats[name].count += x.shape[0]

        return record

    for name in names:
        module = model.get_submodule(name)
        handles.append(module.register_forward_pre_hook(hook(name, in_features_of(module))))
    try:
        yield stats
    finally:
        for handle in handles:
            handle.remove()
    unused = [name for name, s in stats.items() if s.count == 0]
    routed = routed_layers(model, unused)  # experts no token was routed to: count 0 is their answer
    unused = [name for name in unused if name not in routed]
    if unused:
        raise EngineError(f"layers never ran during calibration: {', '.join(unused[:3])}")


@contextmanager
def recording_cross_inputs(model: nn.Module, twins: dict[str, nn.Module]) -> Iterator[dict[str, torch.Tensor]]:
    """``sum x_q x_f^T`` per named layer: ``x_q`` its input, ``x_f`` the input of its twin (same layer
    in a float copy of the model), which must run first on each batch."""
    cross: dict[str, torch.Tensor] = {}
    latest: dict[str, torch.Tensor] = {}
    handles = []

    def hooks(name: str, n: int) -> tuple[Callable, Callable]:
        cross[name] = torch.empty(0)

        def record_twin(_module: nn.Module, args: tuple[Any, ...]) -> None:
            latest[name] = _rows(args, n)

        def record(_module: nn.Module, args: tuple[Any, ...]) -> None:
            cross[name] = _add(cross[name], _rows(args, n), latest.pop(name))

        return record_twin, record

    for name, twin in twins.items():
        record_twin, record = hooks(name, in_features_of(twin))
        handles.append(twin.register_forward_pre_hook(record_twin))
        handles.append(model.get_submodule(name).register_forward_pre_hook(record))
    try:
        yield cross
    finally:
        for handle in handles:
            handle.remove()


def shard_spans(n_windows: int, shard_windows: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of each shard of calibration windows.

    Statistics are summed within a shard and then across shards in shard
    order, wherever the shards were computed: float sums depend on their
    order, and this one fixes it, so one process and any number of Ray
    workers give bit-identical statistics.
    """
    if shard_windows < 1:
        raise EngineError(f"shard size must be >= 1 window, got {shard_windows}")
    return [(start, min(start + shard_windows, n_windows)) for start in range(0, n_windows, shard_windows)]


def worker_spans(n_windows: int, shard_windows: int, workers: int) -> list[list[tuple[int, int]]]:
    """Each worker's contiguous run of shards (:func:`shard_spans`): a shard is the unit of data parallelism, so
    there are at most as many runs as shards, however many workers are asked for."""
    spans = shard_spans(n_windows, shard_windows)
    n = max(1, min(workers, len(spans)))
    return [spans[i * len(spans) // n : (i + 1) * len(spans) // n] for i in range(n)]


@torch.no_grad()
def collect_stats(
    model: nn.Module,
    windows: torch.Tensor,
    names: list[str] | None = None,
    batch_size: int = 8,
    shard_windows: int = SHARD_WINDOWS,
) -> dict[str, LayerStats]:
    """Statistics of every named layer (default: all decoder linears) from one pass of ``model`` over
    token ``windows`` (``[n, seq_len]``), summed shard by shard (see :func:`shard_spans`)."""
    names = names if names is not None else target_linear_names(model)
    device = next(model.parameters()).device
    total: dict[str, LayerStats] | None = None
    for first, stop in shard_spans(len(windows), shard_windows):
        with recording_inputs(model, names) as shard:
            for start in range(first, stop, batch_size):
                model(input_ids=windows[start : min(start + batch_size, stop)].to(device), use_cache=False)
        total = shard if total is None else merge_stats(total, shard)
    return total


def merge_stats(*shards: dict[str, LayerStats]) -> dict[str, LayerStats]:
    """Statistics of the union of data shards: per-layer sums."""
    if not shards:
        raise EngineError("no statistics to merge")
    merged = dict(shards[0])
    for shard in shards[1:]:
        if shard.keys() != merged.keys():
            raise EngineError(f"statistics shards cover different layers: {sorted(shard.keys() ^ merged.keys())[:3]}")
        for name, s in shard.items():
            if s.count and merged[name].count and s.xtx.shape != merged[name].xtx.shape:
                raise EngineError(f"{name}: statistics shards disagree on shape ({tuple(s.xtx.shape)})")
            merged[name] = merged[name].merge(s)
    return merged


def save_stats(stats: dict[str, LayerStats], path: str | Path) -> None:
    """Write statistics (atomically) as safetensors; row counts go in the JSON header."""
    metadata = {"format": STATS_FORMAT, "counts": json.dumps({name: s.count for name, s in stats.items()})}
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
    except (SafetensorError, json.JSONDecodeError, KeyError, ValueError) as exc:
        raise EngineError(f"{path}: unreadable statistics file ({exc})") from None
