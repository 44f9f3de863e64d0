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

import functools
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from engine.errors import EngineError
from engine.options import Option, SettingError

Span = tuple[int, int]
TILE_ALIGN = 64  # column tiles are multiples of this at least (group and packing-chunk boundaries)


class QuantizedWeight(nn.Module, ABC):
    """A frozen low-precision ``[out_features, in_features]`` weight.

    Compute goes through :meth:`matmul` (``x Wᵀ``) and :meth:`matmul_t` (``g W``),
    which by default re-materialise ``W`` in tiles of at most ``tile_numel``
    weights, each weight once per product: column tiles for the forward product
    when the format can decode a span of columns by itself (``column_granule``
    columns at a time), row tiles otherwise and for the input gradient.  A format
    overrides them where its own layout computes better (QuIP#: the rotation is
    applied to the activations).
    """

    format_name: ClassVar[str]

    def __init__(self, out_features: int, in_features: int) -> None:
        super().__init__()
        self.out_features = out_features
        self.in_features = in_features

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.out_features, self.in_features))

    @property
    def has_row_scales(self) -> bool:
        """Whether every output row has scales of its own that :meth:`scale_rows` can multiply (distillation
        tunes one gain per row and folds it in: no bit added)."""
        return False

    def scale_rows(self, gain: torch.Tensor) -> None:
        """Multiply row ``r`` of the weight by ``gain[r]`` in place, through the stored scales."""
        raise EngineError(f"{self.format_name} weights have no per-row scales to multiply")

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
    def column_granule(self) -> int | None:
        """Columns a tile of this weight spans in multiples of, so that no stored unit (group, block, packed
        chunk) is decoded twice; None when columns cannot be decoded without their whole rows."""
        return TILE_ALIGN

    def matmul(self, x: torch.Tensor, tile_numel: int | None = None) -> torch.Tensor:
        """``x @ W^T``: with a tile budget, ``W`` in tiles (see the class docstring)."""
        if tile_numel is None or tile_numel >= self.out_features * self.in_features:
            return x @ resident(self.dequantize(x.dtype), x).T
        granule = self.column_granule
        if granule is None or granule >= self.in_features:
            return row_tiled_matmul(x, self.out_features, lambda r0, r1: self.dequantize(x.dtype, rows=(r0, r1)),
                                    max(1, tile_numel // self.in_features))
        step = max(granule, tile_numel // self.out_features // granule * granule)
        return column_tiled_matmul(x, self.out_features, self.in_features,
                                   lambda c0, c1: self.dequantize(x.dtype, cols=(c0, c1)), step)

    def matmul_t(self, g: torch.Tensor, tile_numel: int | None = None) -> torch.Tensor:
        """``g @ W`` (the input gradient): with a tile budget, ``W`` a block of rows at a time."""
        if tile_numel is None or tile_numel >= self.out_features * self.in_features:
            return g @ resident(self.dequantize(g.dtype), g)
        return row_tiled_matmul_t(g, self.in_features, lambda r0, r1: self.dequantize(g.dtype, rows=(r0, r1)),
                                  max(1, tile_numel // self.in_features))

    @property
    def nbytes(self) -> int:
        """Exact storage in bytes: every persistent buffer (codes, scales, zeros, ...)."""
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / (self.out_features * self.in_features)

    def extra_repr(self) -> str:
        return f"{self.format_name}, shape={tuple(self.shape)}, bits_per_weight={self.bits_per_weight:.3f}"


def resident(weight: torch.Tensor, operand: torch.Tensor) -> torch.Tensor:
    """Refuse a shape-only placeholder next to real data: CPU matmuls against ``meta`` tensors return garbage
    silently.  (On the ``meta`` device everything is shapes, as the device-hygiene tests run it.)"""
    if weight.is_meta and not operand.is_meta:
        raise RuntimeError("quantized weight is not resident: its decoder block was not streamed in")
    return weight


def spans(n: int, step: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, step):
        yield start, min(start + step, n)


def column_tiled_matmul(x: torch.Tensor, n_out: int, n_in: int, tile: Callable[[int, int], torch.Tensor],
                        step: int) -> torch.Tensor:
    """``x @ W^T`` from ``tile(c0, c1) = W[:, c0:c1]``, accumulated in place into one output buffer."""
    x2 = x.reshape(-1, n_in)
    y = torch.zeros(x2.shape[0], n_out, dtype=x.dtype, device=x.device)
    for c0, c1 in spans(n_in, step):
        y.addmm_(x2[:, c0:c1], resident(tile(c0, c1), x).T)
    return y.view(*x.shape[:-1], n_out)


def row_tiled_matmul(x: torch.Tensor, n_out: int, tile: Callable[[int, int], torch.Tensor], step: int) -> torch.Tensor:
    """``x @ W^T`` from ``tile(r0, r1) = W[r0:r1]``: each tile gives a block of output columns."""
    x2 = x.reshape(-1, x.shape[-1])
    y = torch.empty(x2.shape[0], n_out, dtype=x.dtype, device=x.device)
    for r0, r1 in spans(n_out, step):
        torch.mm(x2, resident(tile(r0, r1), x).T, out=y[:, r0:r1])
    return y.view(*x.shape[:-1], n_out)


def row_tiled_matmul_t(g: torch.Tensor, n_in: int, tile: Callable[[int, int], torch.Tensor], step: int) -> torch.Tensor:
    """``g @ W`` from ``tile(r0, r1) = W[r0:r1]``, accumulated over blocks of ``W``'s rows."""
    n_out = g.shape[-1]
    g2 = g.reshape(-1, n_out)
    out = torch.zeros(g2.shape[0], n_in, dtype=g.dtype, device=g.device)
    for r0, r1 in spans(n_out, step):
        out.addmm_(g2[:, r0:r1], resident(tile(r0, r1), g))
    return out.view(*g.shape[:-1], n_in)


def lcm_granule(unit: int) -> int:
    """The smallest multiple of ``TILE_ALIGN`` that is also a multiple of ``unit``."""
    return math.lcm(TILE_ALIGN, unit)



def host_constant(make: Callable[..., Any]) -> Callable[..., Any]:
    """``make``'s table, made once per arguments on the host whatever the default device (a GPU run, or the
    hygiene tests' ``meta``), and moved by each caller to the device it computes on."""

    @functools.lru_cache(maxsize=None)
    @functools.wraps(make)
    def cached(*args: Any) -> Any:
        with torch.device("cpu"):
            return make(*args)

    return cached

@dataclass
class LayerStats:
    """Input statistics of one linear layer: ``xtx = sum_i x_i x_i^T`` over ``count`` rows.

    Stored as float64 sums so shards can be merged exactly by addition.
    """

    xtx: torch.Tensor
    count: int
    # The caller handed the sums over (it keeps no other reference and needs them no more): a quantizer may make
    # its Hessian in their place (:meth:`take_hessian`), one matrix of their size fewer at its peak.
    disposable: bool = False

    @property
    def hessian(self) -> torch.Tensor:
        """The OPTQ proxy Hessian ``H = 2 X^T X / N``."""
        return self.hessian_rows(0, self.xtx.shape[0])  # one new matrix, in the sums' dtype

    def take_hessian(self) -> torch.Tensor:
        """:attr:`hessian` for the caller to overwrite: made in place of the sums when they are ``disposable``
        (``xtx`` is then left empty; the same arithmetic, so the same bits), else a new matrix."""
        if not self.disposable:
            return self.hessian
        return self.give_up().mul_(2.0).div_(max(self.count, 1))

    def give_up(self) -> torch.Tensor:
        """The sums, for a quantizer to use up (``xtx`` is left empty); only for ``disposable`` statistics."""
        assert self.disposable, "the caller keeps these statistics"
        sums, self.xtx = self.xtx, self.xtx.new_empty(0)
        return sums

    def hessian_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of :attr:`hessian`, with the same arithmetic, without the whole matrix."""
        return self.xtx[start:stop].mul(2.0).div_(max(self.count, 1))

    def merge(self, other: LayerStats) -> LayerStats:
        if not (self.count and other.count):  # a side that saw no rows (an expert no token was routed to)
            return other if self.count == 0 else self
        return LayerStats(self.xtx + other.xtx, self.count + other.count)

    @staticmethod
    def uninformative(in_features: int, device: torch.device | str = "cpu") -> LayerStats:
        """``H = I`` for a layer that saw no calibration rows (an expert no token was routed to): every input
        direction weighs the same, so a Hessian quantizer has no error to feed forward and rounds to nearest."""
        return LayerStats(torch.eye(in_features, dtype=torch.float64, device=device), 2)


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
    # Makes its Hessian in place of statistics handed over (LayerStats.take_hessian): the planner then counts a
    # layer's sums gone once it is quantized.
    uses_up_statistics: ClassVar[bool] = False
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
