"""Each stage of a recipe as its use case's spec (``engine.pipelines``), and a spec's setting named by its
recipe key: a problem a spec finds is reported as ``finetune.lora.rank_max: ...``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from engine.errors import EngineError
from engine.options import SettingError, build
from engine.pipelines import (
    CorrectSpec, DataSpec, EvalSpec, ExportSpec, FinetuneSpec, HardwareSpec, PlanSpec, QuantizeSpec, TaskSpec,
)
from engine.quant import all_options

from cluster.sweep import SweepSpec
from recipes.schema import Recipe

T = TypeVar("T")

# Where each stage's spec settings sit in a recipe: (spec path prefix, recipe key prefix), first match wins.
KEYS: dict[str, tuple[tuple[str, str], ...]] = {
    "quantize": (("model", "model.path"), ("", "quantize.")),
    "correct": (("model", "correct"), ("parallel.workers", "cluster.train_workers"), ("", "correct.")),
    "finetune": (("model", "model.path"), ("offload.", "offload."), ("parallel.workers", "cluster.train_workers"),
                 ("", "finetune.")),
    "evaluate": (("data.", "evaluate.tasks[{task}]."), ("", "evaluate.tasks[{task}].")),
    "export": (("", "export."),),
    "hardware": (("", "hardware."),),
    "plan": (("hardware.", "hardware."), ("", "hardware: ")),
    "sweep": (("quantize.model", "model.path"), ("quantize.", "quantize."), ("finetune.offload.", "offload."),
              ("finetune.", "finetune."), ("evaluation.data.", "evaluate.tasks[{task}]."),
              ("evaluation.", "evaluate.tasks[{task}]."), ("grid.", "cluster.sweep.grid."), ("", "cluster.sweep.")),
}


def recipe_key(stage: str, path: str, task: int = 0) -> str:
    for prefix, key in KEYS[stage]:
        if path.startswith(prefix):
            return key.format(task=task) + path[len(prefix):] if prefix != path else key.format(task=task)
    raise AssertionError(f"no recipe key for {stage} setting {path!r}")


def made(stage: str, make: Callable[[], T], task: int = 0) -> T:
    """``make()``, its setting problems named by recipe key."""
    try:
        return make()
    except SettingError as exc:
        raise EngineError(exc.render(lambda path: recipe_key(stage, path, task))) from None


def device_of(recipe: Recipe) -> dict[str, str]:
    """Every stage computes on the recipe's ``hardware.device`` (none: each stage's ``auto``)."""
    hardware = recipe.get("hardware")
    return {"device": hardware["device"]} if hardware and hardware.get("device") else {}


def quantize_spec(recipe: Recipe, out: Path) -> QuantizeSpec:
    q = dict(recipe.get("quantize"))
    settings = {"model": recipe.get("model")["path"], "out": str(out), "method": q.pop("method"),
                "calib": q.pop("calib"), "options": {k: v for k, v in q.items() if v is not None}, **device_of(recipe)}
    assert set(q) <= set(all_options()), sorted(set(q) - set(all_options()))
    return made("quantize", lambda: build(QuantizeSpec, settings))


def parallel_of(recipe: Recipe) -> dict[str, Any]:
    """The training stages' worker group: ``cluster.train_workers`` Ray Train workers of ``cluster.threads`` CPUs
    each, on ``cluster.address`` (none: this process alone)."""
    cluster = recipe.get("cluster") or {}
    if not cluster.get("train_workers"):
        return {}
    return {"parallel": {"workers": cluster["train_workers"], "threads": cluster["threads"],
                         "address": cluster.get("address")}}


def correct_spec(recipe: Recipe, model: str, out: Path, resume: bool) -> CorrectSpec:
    return made("correct", lambda: build(CorrectSpec, {**recipe.get("correct"), "model": model, "out": str(out),
                                                       "resume": resume, **device_of(recipe), **parallel_of(recipe)}))


def finetune_spec(recipe: Recipe, model: str, out: Path, resume: bool) -> FinetuneSpec:
    settings = {**recipe.get("finetune"), "model": model, "out": str(out), "resume": resume,
                "offload": recipe.get("offload") or {}, **device_of(recipe), **parallel_of(recipe)}
    return made("finetune", lambda: build(FinetuneSpec, settings))


def task_specs(recipe: Recipe) -> list[TaskSpec]:
    data_keys = DataSpec.__dataclass_fields__
    specs = []
    for i, task in enumerate(recipe.get("evaluate")["tasks"]):
        settings = {"data": {k: v for k, v in task.items() if k in data_keys},
                    **{k: v for k, v in task.items() if k not in data_keys}}
        specs.append(made("evaluate", lambda: build(TaskSpec, settings), task=i))
    return specs


def eval_spec(recipe: Recipe, model: str, tasks: list[TaskSpec]) -> EvalSpec:
    return EvalSpec(model=model, tasks=tuple(tasks), **device_of(recipe))


def export_spec(recipe: Recipe, run: str, out: Path) -> ExportSpec:
    return made("export", lambda: build(ExportSpec, {**recipe.get("export"), "run": run, "out": str(out),
                                                     **device_of(recipe)}))


def hardware_spec(recipe: Recipe) -> HardwareSpec:
    return made("hardware", lambda: build(HardwareSpec, recipe.get("hardware")))


def plan_spec(recipe: Recipe, shape: str) -> PlanSpec:
    """The planner's view of the recipe's finetune on its declared hardware (at the widest bit width of a
    sweep): the placement the finetune will use, the quantizer's bits and group size."""
    f = finetune_spec(recipe, recipe.get("model")["path"], recipe.output / "finetune", resume=False)  # defaults in
    quantizer = quantize_spec(recipe, recipe.output / "quantized").quantizer().settings
    grid_bits = recipe.sweep["grid"]["bits"] if recipe.sweep else None
    settings: dict[str, Any] = {
        "model": shape,
        "hardware": hardware_spec(recipe),
        "bits": max(grid_bits) if grid_bits else quantizer["bits"],
        "group_size": quantizer.get("group_size", -1),
        "rank": f.lora.adapter_rank,
        "seq_len": f.data.seq_len,
        "batch": f.train.batch_size,
        "tier": f.offload.tier or "device",
        "prefetch": f.offload.prefetch,
        "compute_dtype": f.dtype,
        "optimizer_offload": "yes" if f.offload.optimizer else "no",
    }
    return made("plan", lambda: build(PlanSpec, settings))


def text_task(recipe: Recipe) -> int | None:
    """The first evaluation task on text: the one a sweep scores its trials by."""
    e = recipe.get("evaluate")
    return next((i for i, t in enumerate(e["tasks"]) if t["format"] == "text"), None) if e else None


def sweep_spec(recipe: Recipe, out: Path) -> SweepSpec:
    task = text_task(recipe)
    settings = {
        "out": str(out),
        "quantize": quantize_spec(recipe, out / "quantized"),
        "finetune": finetune_spec(recipe, recipe.get("model")["path"], out / "runs", resume=False),
        "evaluation": task_specs(recipe)[task],
        "grid": recipe.sweep["grid"],
        **{k: v for k, v in recipe.sweep.items() if k != "grid"},
    }
    return made("sweep", lambda: build(SweepSpec, settings), task=task)

