"""What a sweep is: base quantize, finetune and evaluation specs (a recipe's), and a grid of quantization methods,
bit widths, group sizes, LoRA ranks and learning rates.  Every grid point is one trial, and the trial's specs
are the base specs with the point's values: every other setting is carried into every trial."""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from pathlib import Path

from engine.options import SettingError, Spec, setting
from engine.pipelines import EvalSpec, FinetuneSpec, QuantizeSpec, TaskSpec
from engine.quant import all_options, quantizer_class

METRICS = ("eval_ppl", "eval_nll")  # both minimised


@dataclass(frozen=True)
class GridSpec(Spec):
    """The axes of a sweep; an axis left out holds the base specs' one value."""

    method: tuple[str, ...] | None = setting(None, "str", "Quantization methods.", many=True, optional=True)
    bits: tuple[int, ...] | None = setting(None, "int", "Bit widths.", choices=all_options()["bits"].choices,
                                           many=True, optional=True)
    group_size: tuple[int, ...] | None = setting(None, "int", "Group sizes (methods with groups).", minimum=-1,
                                                 many=True, optional=True)
    rank: tuple[int, ...] | None = setting(None, "int", "LoRA ranks [dynamic: 1..rank_max].", minimum=1, many=True,
                                           optional=True)
    lr: tuple[float, ...] | None = setting(None, "float", "Learning rates.", minimum=0.0, above=True, many=True,
                                           optional=True)


@dataclass(frozen=True)
class Point:
    """One trial: a quantized model (method, bits, group size) finetuned at a LoRA rank and learning rate."""

    method: str
    bits: int
    group_size: int | None  # None: the method has no groups (e.g. quip)
    rank: int
    lr: float

    @property
    def quantized_name(self) -> str:
        groups = f"-g{self.group_size}" if self.group_size is not None else ""
        return f"{self.method}-{self.bits}bit{groups}"

    @property
    def name(self) -> str:
        return f"{self.quantized_name}-r{self.rank}-lr{self.lr:g}"


@dataclass(frozen=True)
class Trial:
    """The specs one grid point runs: quantize (cached per method / bits / group size), finetune, evaluate."""

    point: Point
    quantize: QuantizeSpec
    finetune: FinetuneSpec
    evaluate: EvalSpec


@dataclass(frozen=True)
class SweepSpec(Spec):
    """A sweep into ``out``: the base specs (their model and output paths are replaced per trial), the grid,
    the metric every trial reports (from the text task ``evaluation``) and how trials run on Ray."""

    out: str = setting(kind="path", help="Sweep directory.")
    quantize: QuantizeSpec
    finetune: FinetuneSpec
    evaluation: TaskSpec
    grid: GridSpec = dataclasses.field(default_factory=GridSpec)
    metric: str = setting("eval_ppl", "str", "The metric trials are compared by (minimised).", choices=METRICS)
    cpus_per_trial: int = setting(1, "int", "CPUs (torch threads) per trial.", minimum=1)
    max_failures: int = setting(2, "int", "Retries of a failed trial.", minimum=0)

    def validate(self) -> None:
        if self.evaluation.data.format != "text":
            raise SettingError("evaluation.data.format", f"a sweep scores trials by perplexity: needs a text task, "
                               f"got {self.evaluation.data.format!r}")
        lora = self.finetune.lora
        if lora.dynamic and self.grid.rank and max(self.grid.rank) > lora.rank_max:
            raise SettingError("grid.rank", f"{max(self.grid.rank)} is above {{0}} {lora.rank_max}",
                               ("finetune.lora.rank_max",))
        methods = self.grid.method or (self.quantize.method,)
        for key in self.quantize.options:
            if not any(key in quantizer_class(m).options for m in methods):
                raise SettingError(f"quantize.{key}", f"no method of the sweep takes it ({', '.join(methods)})")
        for trial in self.trials():  # every grid point's specs are made (and checked) before Ray starts
            del trial

    def points(self) -> list[Point]:
        """Every combination of the grid, ranks outermost: the first trials to run then quantize different
        models in parallel instead of queueing for the same one."""
        base, lora = self.quantize, self.finetune.lora
        ranks = self.grid.rank or (tuple(range(1, lora.rank_max + 1)) if lora.dynamic else (lora.rank,))
        points: dict[Point, None] = {}  # ordered and de-duplicated (group sizes collapse for methods without)
        for rank, lr, method in itertools.product(ranks, self.grid.lr or (self.finetune.train.lr,),
                                                  self.grid.method or (base.method,)):
            takes = quantizer_class(method).options
            defaults = {**{k: o.default for k, o in takes.items()}, **self._carried(method)}
            for bits, group in itertools.product(self.grid.bits or (defaults["bits"],),
                                                 self.grid.group_size or (defaults.get("group_size"),)):
                points[Point(method, bits, group if "group_size" in takes else None, rank, lr)] = None
        return list(points)

    def _carried(self, method: str) -> dict[str, object]:
        """The base quantize settings that ``method`` takes."""
        takes = quantizer_class(method).options
        return {k: v for k, v in self.quantize.options.items() if k in takes}

    def trial(self, point: Point) -> Trial:
        out = Path(self.out)
        settings = {**self._carried(point.method), "bits": point.bits}
        if point.group_size is not None:
            settings["group_size"] = point.group_size
        calibrated = quantizer_class(point.method).needs_calibration
        if calibrated and self.quantize.calib is None:
            raise SettingError("grid.method", f"{point.method!r} needs calibration data: add {{0}}", ("quantize.calib",))
        quantized = out / "quantized" / point.quantized_name
        try:
            quantize = dataclasses.replace(self.quantize, method=point.method, options=settings, out=str(quantized),
                                           calib=self.quantize.calib if calibrated else None)
        except SettingError as exc:  # a grid value this method does not take
            raise SettingError(f"grid.{exc.field}", f"{point.quantized_name}: {exc.problem}") from None
        f, lora = self.finetune, self.finetune.lora
        run = out / ("dynamic" if lora.dynamic else "runs") / (
            f"{point.quantized_name}-lr{point.lr:g}-rmax{lora.rank_max}" if lora.dynamic else point.name)
        finetune = dataclasses.replace(
            f, model=str(quantized), out=str(run), resume=True, train=dataclasses.replace(f.train, lr=point.lr),
            lora=lora if lora.dynamic else dataclasses.replace(lora, rank=point.rank))
        task = dataclasses.replace(self.evaluation, ranks=(point.rank,) if lora.dynamic else None)
        return Trial(point, quantize, finetune, EvalSpec(model=str(run), tasks=(task,), device=f.device))

    def trials(self) -> list[Trial]:
        return [self.trial(point) for point in self.points()]
