"""Tensors between Ray processes in pieces small enough to ride inside Ray's messages.

Ray carries an object under its ``max_direct_call_object_size`` (100 KiB) inside the messages; a bigger one
goes through the object store, whose shared-memory pages then stay mapped in the RSS of every process that
wrote or read it, long after the object is freed (a 7B calibration worker held 70 MiB of them).  Calibration
moves its large tensors (a layer's summed statistics, its packed weight) as flat runs of pieces instead: a
sender hands out ``count`` pieces from element ``start`` and a receiver copies them in place, a few calls in
flight.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

PIECE_BYTES = 96 << 10  # under Ray's 100 KiB max_direct_call_object_size: carried in messages, not the object store
PIECES_PER_CALL = 32
CALLS_IN_FLIGHT = 4  # pieces in flight are held by the driver: a few calls' worth


def piece_elements(element_size: int) -> int:
    return PIECE_BYTES // element_size


def pieces_of(flat: torch.Tensor, start: int, count: int) -> tuple[np.ndarray, ...]:
    """``count`` pieces of the 1-d ``flat`` from element ``start`` (the last may be short), as host arrays."""
    step = piece_elements(flat.element_size())
    return tuple(flat[start + k * step : start + (k + 1) * step].cpu().numpy() for k in range(count))


def joined(pieces: tuple[np.ndarray, ...], device: torch.device | str = "cpu") -> torch.Tensor:
    """The pieces a receiver got, as one flat tensor on ``device``."""
    return torch.from_numpy(np.concatenate(pieces)).to(device)


def fill(flat: torch.Tensor, start: int, pieces: tuple[np.ndarray, ...]) -> None:
    """Copy the pieces a receiver got into the 1-d ``flat`` from element ``start``."""
    received = joined(pieces, flat.device)
    flat[start : start + received.numel()].copy_(received)


def one_return_each(pieces: tuple[np.ndarray, ...]) -> np.ndarray | tuple[np.ndarray, ...]:
    """A sender's pieces as its Ray return values (``num_returns=len(pieces)``: one object, one message each)."""
    return pieces if len(pieces) > 1 else pieces[0]


def sent_pieces(method: Any, count: int, *args: Any) -> list[Any]:
    """References to the ``count`` pieces a Ray actor's sending ``method`` returns for ``args``."""
    refs = method.options(num_returns=count).remote(*args, count)
    return refs if count > 1 else [refs]


def relay(numel: int, element_size: int, send: Callable[[int, int], Any], receive: Callable[[int, Any], Any]) -> None:
    """Move a flat tensor of ``numel`` elements: ``send(start, count)`` gives ``count`` pieces (or references to
    them) from element ``start``, ``receive(start, pieces)`` takes them in and returns a reference to wait on
    (``None`` when it took them in at once)."""
    import ray

    step = piece_elements(element_size)
    in_flight = []
    for start in range(0, numel, step * PIECES_PER_CALL):
        count = min(PIECES_PER_CALL, -(-(numel - start) // step))
        done = receive(start, send(start, count))
        if done is not None:
            in_flight.append(done)
        if len(in_flight) >= CALLS_IN_FLIGHT:
            ray.get(in_flight.pop(0))
    ray.get(in_flight)


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``'s storage as a flat ``uint8`` view (any dtype, bfloat16 included, travels as bytes)."""
    return tensor.contiguous().view(-1).view(torch.uint8)


TensorSpec = tuple[str, tuple[int, ...]]  # dtype name (torch.float16 -> "float16") and shape


def spec_of(tensor: torch.Tensor) -> TensorSpec:
    return str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape)


def empty_like_spec(spec: TensorSpec) -> torch.Tensor:
    dtype, shape = spec
    return torch.empty(shape, dtype=getattr(torch, dtype))
