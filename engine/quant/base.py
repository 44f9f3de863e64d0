"""The small interface every quantizer plugs in behind.

Two roles, two registries:

* a :class:`QuantizedWeight` is the *result*: an ``nn.Module`` whose buffers are
  the packed tensors (so ``.to(device)``, ``state_dict()`` and offloading work
  for free) plus a JSON-able :meth:`~QuantizedWeight.config`.  Registered by its
  ``format_name`` so a saved model can be rebuilt without pickle.
* a :class:`Quantizer` is the *algorithm*: it turns a float weight (and, for
  Hessian-based methods, :class:`LayerStats`) into a ``QuantizedWeight``.
  Registered by the name users pass as ``--method``.

See ``docs/custom_quantizer.md`` for a worked example of a user's own quantizer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from engine.errors import EngineError

Span = tuple[int, int]


class QuantizedWeight(nn.Module, ABC):
    """A frozen low-precision ``[out_features, in_features]`` weight."""

    format_name: ClassVar[str]

    def __init__(self, out_features: int, in_features: int) -> None:
        super().__init__()
        self.out_features = out_features
        self.in_features = in_features

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.out_features, self.in_features))

    @abstractmethod
    def dequantize(
        self, dtype: torch.dtype = torch.float32, rows: Span | None = None, cols: Span | None = None
    ) -> torch.Tensor:
        """Dense weight, or the tile ``W[rows[0]:rows[1], cols[0]:cols[1]]``."""

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """JSON-able metadata that, with ``state_dict()``, rebuilds this weight."""

    @classmethod
    @abstractmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> QuantizedWeight:
        """Rebuild from :meth:`state_dict` tensors and :meth:`config`."""

    def manifest(self) -> dict[str, Any]:
        """:meth:`config` tagged with the format name, as saved beside the tensors."""
        return {"format": self.format_name, **self.config()}

    @property
    def nbytes(self) -> int:
        """Exact storage in bytes: every persistent buffer (codes, scales, zeros, ...)."""
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / (self.out_features * self.in_features)

    def extra_repr(self) -> str:
        return f"{self.format_name}, shape={tuple(self.shape)}, bits_per_weight={self.bits_per_weight:.3f}"


@dataclass
class LayerStats:
    """Input statistics of one linear layer: ``xtx = sum_i x_i x_i^T`` over ``count`` rows.

    Stored as float64 sums so shards can be merged exactly by addition.
    """

    xtx: torch.Tensor
    count: int

    @property
    def hessian(self) -> torch.Tensor:
        """The OPTQ proxy Hessian ``H = 2 X^T X / N``."""
        return 2.0 * self.xtx / max(self.count, 1)

    def merge(self, other: LayerStats) -> LayerStats:
        return LayerStats(self.xtx + other.xtx, self.count + other.count)


class Quantizer(ABC):
    """Turns a float weight into a :class:`QuantizedWeight`."""

    name: ClassVar[str]
    needs_calibration: ClassVar[bool] = False

    @abstractmethod
    def quantize(self, weight: torch.Tensor, stats: LayerStats | None = None) -> QuantizedWeight:
        """Quantize ``weight`` (``[out, in]``, any float dtype)."""

    def describe(self) -> dict[str, Any]:
        """Settings recorded in a quantized model's metadata."""
        return {"method": self.name}


FORMATS: dict[str, type[QuantizedWeight]] = {}
QUANTIZERS: dict[str, type[Quantizer]] = {}


def register_format(cls: type[QuantizedWeight]) -> type[QuantizedWeight]:
    """Class decorator: make a QuantizedWeight loadable from a saved model."""
    FORMATS[cls.format_name] = cls
    return cls


def register_quantizer(cls: type[Quantizer]) -> type[Quantizer]:
    """Class decorator: make a Quantizer selectable by ``--method NAME``."""
    QUANTIZERS[cls.name] = cls
    return cls


def make_quantizer(method: str, **options: Any) -> Quantizer:
    if method not in QUANTIZERS:
        raise EngineError(f"unknown quantization method {method!r}; allowed: {', '.join(sorted(QUANTIZERS))}")
    return QUANTIZERS[method](**options)


def weight_from_state(tensors: dict[str, torch.Tensor], manifest: dict[str, Any]) -> QuantizedWeight:
    """Inverse of ``(qw.state_dict(), qw.manifest())``."""
    fmt = manifest.get("format")
    if fmt not in FORMATS:
        raise EngineError(f"unknown quantized weight format {fmt!r}; known: {', '.join(sorted(FORMATS))}")
    return FORMATS[fmt].from_state(tensors, manifest)
