"""Where a use case computes: one device and the dtypes the model's parts take there.

Every command takes ``--device {auto,cuda,cpu}`` (recipes: ``hardware.device``);
the use case resolves it once into a :class:`Placement` and hands that down to
loading, adapters, block stores, the trainer and evaluation, so no layer picks
a device of its own.  ``auto`` is CUDA when this process can see a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.errors import EngineError

DEVICES = ("auto", "cuda", "cpu")


def resolve_device(name: str) -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``; ``cuda`` (or ``cuda:N``) without a GPU is refused."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise EngineError(f"device {name!r} is not one of {', '.join(DEVICES)} (or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = f"torch {torch.__version__}" + ("" if torch.version.cuda else ", a build without CUDA")
            raise EngineError(f"device {name!r}: no CUDA device is visible to this process ({build}); "
                              "use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise EngineError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif device.type != "cpu":
        raise EngineError(f"device {name!r} is not one of {', '.join(DEVICES)} (or cuda:N)")
    return device


@dataclass(frozen=True)
class Placement:
    """The compute device and the dtype of the base matmuls."""

    device: torch.device
    compute_dtype: torch.dtype = torch.float32

    @classmethod
    def of(cls, device: str, compute_dtype: torch.dtype = torch.float32) -> Placement:
        return cls(resolve_device(device), compute_dtype)

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def reset_peak(self) -> None:
        if self.is_cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_bytes(self) -> int | None:
        """Peak bytes the caching allocator handed out on the device since :meth:`reset_peak` (None on CPU)."""
        return torch.cuda.max_memory_allocated(self.device) if self.is_cuda else None

    def describe(self) -> dict[str, object]:
        out: dict[str, object] = {"device": str(self.device), "compute_dtype": str(self.compute_dtype).split(".")[-1]}
        if self.is_cuda:
            out["device_name"] = torch.cuda.get_device_name(self.device)
            out["peak_allocated_bytes"] = self.peak_bytes()
        return out
