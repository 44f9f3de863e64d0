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
from engine.options import Option, SettingError

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
    """Turns a float weight into a :class:`QuantizedWeight`.

    A quantizer declares its settings once, in ``options`` (name -> :class:`Option`
    with its default, range and help line); the command line, recipes, sweeps and
    validation are derived from that table.  Each default is the best setting
    measured for the method (``docs/quality.md``).  Settings become attributes of
    the instance; ``validate`` checks combinations.  A ``randomized`` method also
    takes the calibration ``seed``.
    """

    name: ClassVar[str]
    needs_calibration: ClassVar[bool] = False
    randomized: ClassVar[bool] = False
    options: ClassVar[dict[str, Option]] = {}

    def __init__(self, seed: int = 0, **settings: Any) -> None:
        for key in settings:
            if key not in self.options:
                takes = ", ".join(self.options) or "no settings"
                raise SettingError(key, f"method {self.name!r} does not take it; it takes {takes}")
        self.settings = {
            key: option.check(option.default if settings.get(key) is None else settings[key], key)
            for key, option in self.options.items()
        }
        self.seed = seed
        self.__dict__.update(self.settings)
        self.validate()

    def validate(self) -> None:
        """Rules across settings (raise :class:`SettingError` naming the setting to change)."""

    @abstractmethod
    def quantize(self, weight: torch.Tensor, stats: LayerStats | None = None) -> QuantizedWeight:
        """Quantize ``weight`` (``[out, in]``, any float dtype)."""

    def describe(self) -> dict[str, Any]:
        """Settings recorded in a quantized model's metadata: ``make_quantizer(**describe())`` rebuilds it."""
        return {"method": self.name, **self.settings, **({"seed": self.seed} if self.randomized else {})}


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


def quantizer_class(method: str) -> type[Quantizer]:
    if method not in QUANTIZERS:
        raise SettingError("method", f"unknown quantization method {method!r}; allowed: {', '.join(sorted(QUANTIZERS))}")
    return QUANTIZERS[method]


def make_quantizer(method: str, **options: Any) -> Quantizer:
    return quantizer_class(method)(**options)


def all_options() -> dict[str, Option]:
    """Every setting any registered method takes, by name, as one option that admits what any of those
    methods admits (unset means the method's own default; each method still checks its value)."""
    declared: dict[str, list[Option]] = {}
    for cls in QUANTIZERS.values():
        for key, option in cls.options.items():
            declared.setdefault(key, []).append(option)
    union = {}
    for key, options in declared.items():
        choices = None
        if all(option.choices is not None for option in options):
            choices = tuple(sorted({choice for option in options for choice in option.choices}))
        union[key] = Option(options[0].kind, None, options[0].help, choices=choices, optional=True)
    return union


def methods_taking(key: str) -> list[str]:
    return sorted(name for name, cls in QUANTIZERS.items() if key in cls.options)


def weight_from_state(tensors: dict[str, torch.Tensor], manifest: dict[str, Any]) -> QuantizedWeight:
    """Inverse of ``(qw.state_dict(), qw.manifest())``."""
    fmt = manifest.get("format")
    if fmt not in FORMATS:
        raise EngineError(f"unknown quantized weight format {fmt!r}; known: {', '.join(sorted(FORMATS))}")
    return FORMATS[fmt].from_state(tensors, manifest)
