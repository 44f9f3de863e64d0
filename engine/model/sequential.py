"""Calibrated quantization block by block: sequential (the OPTQ paper's protocol) and independent.

The calibration windows' hidden states are carried from decoder block to
decoder block, so only the block at work needs its weights: a model built on
``meta`` has each block materialised before it and saved and released after
it (:class:`BlockLifecycle`), and holds one block's float weights at a time; the input embeddings go once every
window is embedded (at 7B, 250 MiB of bfloat16 the blocks never use).

*Sequential*: each decoder block's layers are calibrated on the output of the
already quantized blocks before it.  Within a block, layers that consume one input
tensor (q/k/v; gate/up) are quantized together, and the layers after them
(o; down) are calibrated with those already quantized, so every layer can
compensate the error upstream of it ("true sequential").

With ``asym_alpha > 0`` a layer is also pulled towards the *float* model's
output (asymmetric calibration, as in GPTAQ, Li et al. 2025): with ``X`` its
input in the float model and ``X_q`` in the partly quantized one, the weight
handed to the quantizer is ``W + alpha * W (X - X_q)^T X_q (X_q^T X_q)^-1``,
which at ``alpha = 1`` turns minimizing ``||(W' - Q) X_q||`` (what every
Hessian quantizer does) into minimizing ``||W X - Q X_q||``.  It works for any
quantizer, since only the weight it is given changes.  A mixture-of-experts
expert is not aligned: the float and the quantized model route different
tokens to it, so its ``X`` and ``X_q`` have no rows in common.

*Independent*: every layer is calibrated on the float model's inputs (each
block's statistics are taken, and the hidden states advanced, before the block
is quantized).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from engine.errors import EngineError
from engine.model.experts import expert_groups, routed_layers
from engine.model.quantize import (
    decoder_blocks, linear_weight, quantize_model, set_linear_weight, target_linear_names,
)
from engine.model.stats import recording_cross_inputs, recording_inputs, shard_spans
from engine.quant.base import LayerStats, QuantizedWeight, Quantizer

Wrap = Callable[[QuantizedWeight, torch.Tensor | None], nn.Module]
BlockCall = tuple[tuple[Any, ...], dict[str, Any]]
ALIGN_DAMP = 0.01  # ridge of the least-squares alignment, a fraction of the mean diagonal of X_q^T X_q


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once what it was run for has been recorded."""


@torch.no_grad()
def first_block_inputs(model: nn.Module, windows: torch.Tensor, batch_size: int) -> list[BlockCall]:
    """Per batch of token windows, the arguments the model passes to its first decoder block."""
    captured: list[BlockCall] = []

    def capture(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        captured.append((args, kwargs))
        raise _StopForward

    device = next(model.parameters()).device
    handle = decoder_blocks(model)[0].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        for start in range(0, len(windows), batch_size):
            try:
                model(input_ids=windows[start : start + batch_size].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


def _hidden(call: BlockCall) -> torch.Tensor:
    args, kwargs = call
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(call: BlockCall, hidden: torch.Tensor) -> BlockCall:
    args, kwargs = call
    return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})


def _run(block: nn.Module, call: BlockCall) -> torch.Tensor:
    out = block(*call[0], **call[1])
    return out[0] if isinstance(out, tuple) else out


def _run_until(block: nn.Module, call: BlockCall, last: nn.Module) -> None:
    """Run ``block`` only until its submodule ``last`` has run (all a group's statistics need)."""

    def stop(_module: nn.Module, _args: Any, _out: Any) -> None:
        raise _StopForward

    handle = last.register_forward_hook(stop)
    try:
        _run(block, call)
    except _StopForward:
        pass
    finally:
        handle.remove()


@torch.no_grad()
def shared_input_groups(model: nn.Module, block: nn.Module, names: list[str], call: BlockCall) -> list[list[str]]:
    """``names`` grouped by the input tensor they consume, in the order ``block`` calls them.

    For a Llama block: [q, k, v], [o], [gate, up], [down].
    """
    calls: list[tuple[str, torch.Tensor]] = []
    handles = [
        model.get_submodule(name).register_forward_pre_hook(lambda _m, a, name=name: calls.append((name, a[0])))
        for name in names
    ]
    try:
        _run(block, call)
    finally:
        for handle in handles:
            handle.remove()
    groups: list[list[str]] = []
    previous: torch.Tensor | None = None  # kept alive by `calls`, so identity is meaningful
    for name, x in calls:
        if any(name in group for group in groups):
            continue
        if x is previous:
            groups[-1].append(name)
        else:
            groups.append([name])
        previous = x
    missing = [n for n in names if not any(n in group for group in groups)]
    routed = routed_layers(model, missing)  # experts this batch routed no token to
    if len(routed) < len(missing):
        raise EngineError(f"layers never ran during calibration: {', '.join(n for n in missing if n not in routed)}")
    return groups + expert_groups(model, [n for n in missing if n in routed])


def aligned_weight(weight: torch.Tensor, stats: LayerStats, cross: torch.Tensor, alpha: float) -> torch.Tensor:
    """``W + alpha W (X - X_q)^T X_q (X_q^T X_q + ridge)^-1`` from ``stats.xtx = X_q^T X_q`` and
    ``cross = X_q^T X`` (see the module docstring), in the statistics' dtype.

    ``cross`` is the caller's to give up: it is overwritten with ``(X - X_q)^T X_q`` transposed, and the ridge
    is added to ``stats.xtx`` in place (and taken off again), so beside the statistics only the solve's own
    factor is Hessian-sized: at 7B shapes that is two 485 MB matrices fewer than a difference and a ridged copy.
    """
    h = stats.xtx
    w = weight.detach().to(device=h.device, dtype=h.dtype)
    shift = w @ cross.sub_(h.T).T  # W (X - X_q)^T X_q: the same operands, element for element, as W (cross^T - h)
    del cross  # the caller popped it from its dict: freed here, before the solve
    ridge = ALIGN_DAMP * h.diagonal().mean()
    diagonal = h.diagonal().clone()
    h.diagonal().add_(ridge)
    try:
        correction = torch.linalg.solve(h, shift.T).T
    finally:
        h.diagonal().copy_(diagonal)  # the quantizer gets the statistics as they were, bit for bit
    return (w + alpha * correction).to(weight.dtype).to(weight.device)


@dataclass
class BlockLifecycle:
    """What happens to a decoder block around its calibration: made resident before it, saved and released after
    it (a model built on ``meta``).  The default does nothing: a resident model."""

    load: Callable[[int], None] = lambda index: None
    done: Callable[[int], None] = lambda index: None
    embedded: Callable[[], None] = lambda: None  # every window is embedded: the input embeddings may go


class CalibrationShard:
    """One shard of calibration windows and their activations, carried block by block.

    The shard keeps its windows' activations at the current block and computes
    statistics from them (a group's, sequential; the whole block's, independent),
    then advances them through the block.  The runner sums the shards'
    statistics in shard order, so the result does not depend on how many
    processes held the shards (see :class:`ShardRunner`).  Whoever holds the
    shards brings each block in before :meth:`begin_block` and may release it
    after :meth:`end_block` (:class:`BlockLifecycle`).
    """

    def __init__(self, model: nn.Module, windows: torch.Tensor, batch_size: int, asym: bool) -> None:
        self.model, self.windows, self.batch_size, self.asym = model, windows, batch_size, asym
        self.blocks = decoder_blocks(model)
        self.prefix = next(name for name, module in model.named_modules() if module is self.blocks)
        self._calls: list[BlockCall] | None = None
        self.float_hidden: list[torch.Tensor] | None = None
        self.float_block: nn.Module | None = None
        self._advanced: list[BlockCall] | None = None  # the next block's activations, made by block_stats

    @property
    def calls(self) -> list[BlockCall]:
        if self._calls is None:  # the first block's inputs, captured on first use
            self.capture_inputs()
        return self._calls

    def capture_inputs(self) -> None:
        """The first block's inputs (the windows embedded), made now: after them the input embeddings may go."""
        if self._calls is None:
            self._calls = first_block_inputs(self.model, self.windows, self.batch_size)
            self.float_hidden = [_hidden(call) for call in self._calls] if self.asym else None

    @torch.no_grad()
    def groups(self, index: int, names: list[str]) -> list[list[str]]:
        return shared_input_groups(self.model, self.blocks[index], names, self.calls[0])

    def begin_block(self, index: int) -> None:
        """Keep a float copy of the block beside the one being quantized (asymmetric calibration needs both)."""
        if self.asym:
            self.float_block = copy.deepcopy(self.blocks[index])

    @torch.no_grad()
    def block_stats(self, index: int, names: list[str]) -> tuple[dict[str, LayerStats], dict[str, torch.Tensor]]:
        """Independent mode: the statistics of every named layer of block ``index`` on the current activations
        (no cross statistics).  The block's outputs, made on the way, are the next block's activations: kept
        for :meth:`end_block`, so the layers may be quantized in between."""
        outputs = []
        with recording_inputs(self.model, names) as stats:
            for call in self.calls:
                outputs.append(_run(self.blocks[index], call))
        self._advanced = [_with_hidden(call, out) for call, out in zip(self.calls, outputs)]
        return stats, {}

    @torch.no_grad()
    def group_stats(self, index: int, group: list[str]) -> tuple[dict[str, LayerStats], dict[str, torch.Tensor]]:
        """``X_q^T X_q`` of each layer in ``group`` over this shard, and ``X_q^T X`` (float twin) if asymmetric."""
        block, block_prefix = self.blocks[index], f"{self.prefix}.{index}."
        twins = {n: self.float_block.get_submodule(n[len(block_prefix) :]) for n in group} if self.float_block else {}
        routed = routed_layers(self.model, group)  # experts are not aligned: see the top
        paired = {n: twin for n, twin in twins.items() if n not in routed}
        with recording_inputs(self.model, group) as stats, recording_cross_inputs(self.model, paired) as cross:
            for i, call in enumerate(self.calls):
                if self.float_block is not None:
                    _run_until(self.float_block, _with_hidden(call, self.float_hidden[i]), twins[group[-1]])
                _run_until(block, call, self.model.get_submodule(group[-1]))
        return stats, cross

    @torch.no_grad()
    def end_block(self, index: int) -> None:
        """Advance the activations through block ``index`` (quantized, sequential; float, independent: the outputs
        :meth:`block_stats` made), and the float twin's."""
        block = self.blocks[index]
        if self.float_block is not None:
            self.float_hidden = [_run(self.float_block, _with_hidden(c, h)) for c, h in zip(self.calls, self.float_hidden)]
            self.float_block = None
        advanced, self._advanced = self._advanced, None
        self._calls = advanced or [_with_hidden(call, _run(block, call)) for call in self.calls]


Statistics = tuple[dict[str, LayerStats], dict[str, torch.Tensor]]  # a shard's: X_q^T X_q per layer, X_q^T X


def fold_into(total: Statistics, part: Statistics) -> Statistics:
    """``total`` plus the next shard's ``part``, added into ``total``'s own tensors (the sum of shards is a left
    fold in shard order, and ``a.add_(b)`` has the bits of ``a + b``); a layer that saw no rows in one of them
    (an expert no token was routed to) keeps the other's sums."""
    stats, cross = total
    for name, s in part[0].items():
        if stats[name].count == 0:
            stats[name] = s
        elif s.count:
            stats[name].xtx.add_(s.xtx)
            stats[name].count += s.count
    for name, c in part[1].items():
        cross[name].add_(c)
    return total


def calibrate_group(
    model: nn.Module, quantizer: Quantizer, names: list[str], stats: dict[str, LayerStats],
    cross: dict[str, torch.Tensor], asym_alpha: float, wrap: Wrap | None,
) -> list[str]:
    """Quantize ``names`` in place from their summed statistics, each weight first aligned to the float model's
    output when it has cross statistics (asymmetric calibration).  ``stats`` and ``cross`` are used up: a
    quantizer may make its Hessian in place of a layer's sums (:meth:`LayerStats.take_hessian`)."""
    for s in stats.values():
        s.disposable = True
    for name in list(cross):
        linear = model.get_submodule(name)
        set_linear_weight(linear, aligned_weight(linear_weight(linear), stats[name], cross.pop(name), asym_alpha))
    return quantize_model(model, quantizer, names, stats, wrap)


class ShardRunner:
    """Runs :class:`CalibrationShard` methods over every shard and quantizes layers: here, in this process.

    The Ray runner (``cluster.calibrate``) implements :meth:`call` and
    :meth:`calibrate` with shards on workers and layers quantized there in
    parallel; the driver loop in :func:`quantize_blockwise` is shared, and
    both sum the shards in shard order, so both give the same weights.
    """

    def __init__(self, model: nn.Module, windows: torch.Tensor, batch_size: int, asym: bool, shard_windows: int) -> None:
        spans = shard_spans(len(windows), shard_windows)
        self.shards = [CalibrationShard(model, windows[a:b], batch_size, asym) for a, b in spans]

    def call(self, method: str, *args: Any) -> list[Any]:
        """``method(*args)`` on every shard, results in shard order."""
        return [getattr(shard, method)(*args) for shard in self.shards]

    def stats(self, method: str, index: int, names: list[str]) -> Statistics:
        """The statistics ``method`` (``group_stats`` or ``block_stats``) of ``names`` summed over the shards,
        each added as soon as it is made: the sum and one shard's statistics are alive, however many shards."""
        total: Statistics | None = None
        for shard in self.shards:
            part = getattr(shard, method)(index, names)
            total = part if total is None else fold_into(total, part)
        return total

    def calibrate(
        self, model: nn.Module, quantizer: Quantizer, index: int, names: list[str], method: str, asym_alpha: float,
        wrap: Wrap | None,
    ) -> list[str]:
        """Quantize ``names`` of block ``index`` of the driver's ``model`` in place, from the shards' statistics
        ``method`` (the shards share ``model``, so they see the packed layers too)."""
        stats, cross = self.stats(method, index, names)
        return calibrate_group(model, quantizer, names, stats, cross if asym_alpha else {}, asym_alpha, wrap)


@torch.no_grad()
def quantize_blockwise(
    model: nn.Module,
    quantizer: Quantizer,
    runner: ShardRunner,
    names: list[str] | None = None,
    wrap: Wrap | None = None,
    asym_alpha: float = 0.0,
    sequential: bool = True,
    lifecycle: BlockLifecycle | None = None,
) -> list[str]:
    """Quantize ``names`` (default: all decoder linears) block by block, as described above, with the
    calibration shards of ``runner``; ``lifecycle`` brings each block in and saves and releases it."""
    if not 0.0 <= asym_alpha <= 1.0:
        raise EngineError(f"asymmetric calibration alpha must be in [0, 1], got {asym_alpha}")
    lifecycle = lifecycle or BlockLifecycle()
    names = names if names is not None else target_linear_names(model)
    blocks = decoder_blocks(model)
    prefix = next(name for name, module in model.named_modules() if module is blocks)
    done: list[str] = []
    mode = "sequential" if sequential else "independent"
    runner.call("capture_inputs")
    lifecycle.embedded()
    for index in tqdm(range(len(blocks)), desc=f"calibrate ({quantizer.name}, {mode})", unit="block", leave=False):
        block_names = [n for n in names if n.startswith(f"{prefix}.{index}.")]
        lifecycle.load(index)
        runner.call("begin_block", index)
        if not block_names:
            groups = []
        elif sequential:  # each group on the output of the quantized groups before it
            groups = runner.call("groups", index, block_names)[0]
        else:  # every layer on the float block's inputs, whose outputs block_stats keeps for end_block
            groups = [block_names]
        for group in groups:
            method = "group_stats" if sequential else "block_stats"
            done += runner.calibrate(model, quantizer, index, group, method, asym_alpha, wrap)
        runner.call("end_block", index)
        lifecycle.done(index)
    outside = sorted(set(names) - set(done))
    if outside:
        raise EngineError(f"layers outside the decoder blocks cannot be calibrated block by block: {outside[:3]}")
    return done
