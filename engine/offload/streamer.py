"""Stream decoder blocks' packed weights from a :class:`BlockStore` while the model computes.

Each block's quantized-weight buffers are swapped for shape-only ``meta``
placeholders and live in the store.  Hooks on the blocks bring a block in just
before it computes and release it right after, while a background thread
fetches the next ``prefetch`` blocks of the schedule:

* forward: blocks ``0 .. L-1``;
* backward (when the forward ran with grad): ``L-1 .. 0``.  Two identity
  autograd functions mark each block's output (its backward starts there: bring
  the block in) and its input (its backward is done there: release it).  The
  input marker also takes a tiny tensor that requires grad, so block 0 is in
  the graph even though embeddings are frozen.

With gradient checkpointing the recomputed forward runs between those two
markers, so the block is resident for it.  At most ``1 + prefetch`` blocks are
held at once (plus, at the forward/backward turn, the blocks the backward
needs first, which are kept instead of being read again).

On the disk tier, chosen when memory is what is short, the heap's free pages
go back to the kernel twice a training step, when the forward is done and when
the backward is: glibc otherwise keeps what the blocks' buffers and temporaries
freed, so the process grows well past its live tensors.  This trades a few
percent of throughput (pages faulted in again) for a lower peak.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch import nn

from engine.errors import EngineError
from engine.model.quantize import decoder_blocks
from engine.offload.store import BlockStore, Tensors
from engine.procstat import release_free_heap
from engine.quant.base import QuantizedWeight

Slot = tuple[nn.Module, str, str]  # (module, parameter or buffer name, key in the block's tensor dict)


class _BlockInput(torch.autograd.Function):
    """Identity on a block's input; its backward means the block's backward is finished."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, anchor: torch.Tensor, streamer: BlockStreamer, index: int) -> torch.Tensor:
        ctx.streamer, ctx.index = streamer, index
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        ctx.streamer._backward_done(ctx.index)
        return grad, None, None, None


class _BlockOutput(torch.autograd.Function):
    """Identity on a block's output; its backward means the block's backward is about to run."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, streamer: BlockStreamer, index: int) -> torch.Tensor:
        ctx.streamer, ctx.index = streamer, index
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        ctx.streamer._backward_start(ctx.index)
        return grad, None, None


class BlockStreamer:
    """Moves ``model``'s decoder-block weights into ``store`` and streams them back on demand.

    ``streamed`` picks what of a block streams: its packed quantized weights (default), or every float weight
    (:func:`float_weights`: a float teacher whose blocks are read from its checkpoint).
    """

    def __init__(self, model: nn.Module, store: BlockStore, prefetch: int = 1,
                 streamed: Callable[[nn.Module], tuple[list[Slot], Tensors]] | None = None) -> None:
        if prefetch < 0:
            raise EngineError(f"prefetch must be >= 0, got {prefetch}")
        self.store, self.prefetch = store, prefetch
        self.blocks = decoder_blocks(model)
        self.slots: list[list[Slot]] = []
        self.placeholders: list[Tensors] = []
        for index, block in enumerate(self.blocks):
            slots, tensors = (streamed or packed_weights)(block)
            if not slots:
                raise EngineError(f"decoder block {index} has no quantized weights to stream (quantize the model first)")
            if index not in store:
                if any(t.is_meta for t in tensors.values()):
                    raise EngineError(f"decoder block {index}: weights are not materialised and not in the {store.tier} store")
                store.put(index, tensors)
            self.slots.append(slots)
            self.placeholders.append({k: torch.empty(t.shape, dtype=t.dtype, device="meta") for k, t in tensors.items()})
            self._assign(index, self.placeholders[index])
        self.n_blocks = len(self.blocks)
        self._resident: set[int] = set()
        self._pending: dict[int, Future[Tensors]] = {}
        self._in_backward: set[int] = set()
        self._training_pass = False
        self.max_resident = 0
        self.trim_heap = store.tier == "disk"
        self._anchor = torch.zeros((), requires_grad=True, device=store.device)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="block-prefetch")
        self._hooks = []
        for index, block in enumerate(self.blocks):
            self._hooks.append(block.register_forward_pre_hook(self._pre_hook(index), with_kwargs=True))
            self._hooks.append(block.register_forward_hook(self._post_hook(index)))

    # -- residency ----------------------------------------------------------------------------------

    def _assign(self, index: int, tensors: Tensors) -> None:
        for module, name, key in self.slots[index]:
            if key not in tensors:
                raise EngineError(f"block {index}: the {self.store.tier} store lacks tensor {key!r}")
            if name in module._parameters:
                module._parameters[name] = nn.Parameter(tensors[key], requires_grad=False)
            else:
                module._buffers[name] = tensors[key]

    def _prefetch(self, index: int) -> None:
        if index in self._resident or index in self._pending:
            return
        if self.store.fetch_is_enqueue:
            self._pending[index] = done = Future()
            done.set_result(self.store.fetch(index))
        else:
            self._pending[index] = self._executor.submit(self.store.fetch, index)

    def _acquire(self, index: int) -> None:
        if index in self._resident:
            return
        future = self._pending.pop(index, None)
        tensors = future.result() if future is not None else self.store.fetch(index)
        self._assign(index, self.store.ready(index, tensors))
        self._resident.add(index)
        self.max_resident = max(self.max_resident, len(self._resident) + len(self._pending))

    def _release(self, index: int) -> None:
        if index in self._resident:
            self._assign(index, self.placeholders[index])
            self._resident.discard(index)

    def _schedule(self) -> list[int]:
        forward = list(range(self.n_blocks))
        return forward + forward[::-1] if self._training_pass else forward

    def _upcoming(self, position: int, count: int) -> list[int]:
        """The next ``count`` distinct blocks of the schedule after ``position``."""
        out: list[int] = []
        for index in self._schedule()[position + 1 :]:
            if len(out) == count:
                break
            if index not in out:
                out.append(index)
        return out

    # -- hooks --------------------------------------------------------------------------------------

    def _pre_hook(self, index: int):
        def hook(block: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            if index in self._in_backward:  # a checkpoint's recompute: the backward marker brought it in
                return None
            if index == 0:
                self._training_pass = torch.is_grad_enabled()
            self._acquire(index)
            for upcoming in self._upcoming(index, self.prefetch):
                self._prefetch(upcoming)
            if not self._training_pass:
                return None
            if args:
                return (_BlockInput.apply(args[0], self._anchor, self, index), *args[1:]), kwargs
            kwargs["hidden_states"] = _BlockInput.apply(kwargs["hidden_states"], self._anchor, self, index)
            return args, kwargs

        return hook

    def _post_hook(self, index: int):
        def hook(block: nn.Module, args: tuple, output: Any) -> Any:
            if index in self._in_backward:
                return None
            if index not in self._upcoming(index, self.prefetch + 1):
                self._release(index)
            if not self._training_pass:
                return None
            if self.trim_heap and index == self.n_blocks - 1:  # the forward is done; the loss and backward come next
                release_free_heap()
            if isinstance(output, tuple):
                return (_BlockOutput.apply(output[0], self, index), *output[1:])
            return _BlockOutput.apply(output, self, index)

        return hook

    def _backward_start(self, index: int) -> None:
        self._in_backward.add(index)
        self._acquire(index)
        for upcoming in self._upcoming(2 * self.n_blocks - 1 - index, self.prefetch):
            self._prefetch(upcoming)

    def _backward_done(self, index: int) -> None:
        self._in_backward.discard(index)
        self._release(index)
        if self.trim_heap and index == 0:  # the backward is done; the optimizer's step comes next
            release_free_heap()

    # -- lifecycle ----------------------------------------------------------------------------------

    def materialize(self) -> None:
        """Bring every block back into the model (to save it, or to stop streaming)."""
        for index in range(self.n_blocks):
            self._acquire(index)

    def close(self) -> None:
        """Remove the hooks and stop the prefetch thread; blocks not resident stay placeholders."""
        for handle in self._hooks:
            handle.remove()
        for future in self._pending.values():
            future.result()
        self._pending.clear()
        self._executor.shutdown()


def packed_weights(block: nn.Module) -> tuple[list[Slot], Tensors]:
    """The buffers of a block's quantized weights (codes, scales, zero points, ...), by name within the block."""
    slots, tensors = [], {}
    for module_name, module in block.named_modules():
        if isinstance(module, QuantizedWeight):
            for name, buffer in module._buffers.items():
                if buffer is not None and name not in module._non_persistent_buffers_set:
                    key = f"{module_name}.{name}"
                    slots.append((module, name, key))
                    tensors[key] = buffer
    return slots, tensors


def float_weights(block: nn.Module) -> tuple[list[Slot], Tensors]:
    """Every parameter and persistent buffer of a float block, by name within the block."""
    slots, tensors = [], {}
    for module_name, module in block.named_modules():
        for name, tensor in [*module._parameters.items(), *module._buffers.items()]:
            if tensor is not None and name not in module._non_persistent_buffers_set:
                key = f"{module_name}.{name}" if module_name else name
                slots.append((module, name, key))
                tensors[key] = tensor
    return slots, tensors
