"""Run a validated recipe stage by stage, resumably, and write its report.

The output directory::

    recipe.json        the validated recipe this output was last run with
    stages/NAME.json   a finished stage: its fingerprint, metrics, time, peak memory, artefact sizes
    quantized/         the quantized model              (quantize)
    corrected/         the LREC-corrected model         (correct)
    finetuned/         the finetune run, with adapter/  (finetune)
    sweep/             the Ray Tune sweep               (cluster.sweep)
    eval/results.json  every metric of every model      (evaluate)
    export/            PEFT adapter (+ merged model)    (export)
    report.json, report.md

A stage's fingerprint hashes its settings, the content of the files it reads
and the fingerprint of the stage before it.  A stage whose finished record
carries the same fingerprint is skipped; an interrupted finetune or correct
continues from its last checkpoint (bit-identical to an uninterrupted run);
anything else in a stage's folder that does not match is cleared and redone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from engine.errors import EngineError
from engine.pipelines import correct, evaluate, export, finetune, plan, quantize
from engine.placement import resolve_device
from engine.procstat import PeakRss, status_bytes
from engine.storage import atomic_write_bytes, atomic_write_json, output_lock

from recipes.checks import plan_shape
from recipes.report import render_markdown
from recipes.schema import PRODUCTS, Recipe
from recipes.specs import (
    correct_spec, eval_spec, export_spec, finetune_spec, plan_spec, quantize_spec, sweep_spec, task_specs,
)

STAGE_DIRS = {"quantize": "quantized", "correct": "corrected", "finetune": "finetuned", "sweep": "sweep",
              "evaluate": "eval", "export": "export"}
MODEL_STAGES = ("quantize", "correct", "finetune", "sweep")  # stages whose output the next stages start from
HASHED_FILE_BYTES = 64 << 20  # larger files are identified by size and modification time


# --------------------------------------------------------------------------------------------------
# Fingerprints


def _identity(path: Path) -> Any:
    if path.is_dir():
        return {str(p.relative_to(path)): _identity(p) for p in sorted(path.rglob("*")) if p.is_file()}
    stat = path.stat()
    if stat.st_size > HASHED_FILE_BYTES:
        return f"{stat.st_size}:{stat.st_mtime_ns}"
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _inputs(settings: Any) -> dict[str, Any]:
    """The identity of every existing file or folder named in ``settings``."""
    found: dict[str, Any] = {}

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)
        elif isinstance(value, str) and value.startswith("/") and Path(value).exists():
            found[value] = _identity(Path(value))

    walk(settings)
    return found


def stage_settings(recipe: Recipe, stage: str) -> dict[str, Any]:
    """What a stage's result depends on.  Placement (offload tier, Ray workers) is left out: it changes
    where the work runs, not its result."""
    if stage == "sweep":
        return {k: recipe.get(k) for k in ("quantize", "finetune", "evaluate")} | {"sweep": recipe.sweep}
    return {stage: recipe.get(stage)}


def fingerprints(recipe: Recipe) -> dict[str, str]:
    """Each stage's fingerprint: its own settings and inputs, and the fingerprint of the model it starts
    from (the recipe's, or the last model-making stage's), so changing one stage redoes those after it
    that use its model, and nothing else."""
    model = _digest({"model": recipe.get("model"), "inputs": _inputs(recipe.get("model"))})
    out = {}
    for stage in recipe.stages:
        settings = stage_settings(recipe, stage)
        out[stage] = _digest({"model": model, "settings": settings, "inputs": _inputs(settings)})
        if stage in MODEL_STAGES:
            model = out[stage]
    return out


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


# --------------------------------------------------------------------------------------------------
# Stages


class Context:
    """Where a recipe's stages read and write, and the models they leave behind."""

    def __init__(self, recipe: Recipe) -> None:
        self.recipe = recipe
        self.out = recipe.output

    def stage_dir(self, stage: str) -> Path:
        return self.out / STAGE_DIRS[stage]

    def product(self, name: str) -> str:
        """The model a stage left behind: ``float``, ``quantized``, ``corrected`` or ``finetuned``."""
        if name == "float":
            return self.recipe.get("model")["path"]
        return str(self.stage_dir(PRODUCTS[name]))

    def last_model(self) -> str:
        """The newest model before finetuning: corrected, else quantized, else the recipe's model."""
        for name, stage in (("corrected", "correct"), ("quantized", "quantize")):
            if self.recipe.get(stage) is not None:
                return name
        return "float"


def run_quantize(ctx: Context, out: Path, resume: bool) -> dict[str, Any]:
    spec = quantize_spec(ctx.recipe, out)
    cluster = ctx.recipe.get("cluster") or {}
    workers = cluster.get("calibrate_workers")
    if workers:
        from cluster.calibrate import on_ray

        manifest = quantize(spec, **on_ray(spec.model, workers, cluster["threads"], cluster.get("address"),
                                           resolve_device(spec.device).type))
    else:
        manifest = quantize(spec)
    return {"bits_per_weight": manifest["size"]["bits_per_weight"], "model_bytes": manifest["size"]["model_bytes"],
            "quantizer": manifest.get("quantizer", {})}


def run_correct(ctx: Context, out: Path, resume: bool) -> dict[str, Any]:
    model = ctx.product("quantized" if ctx.recipe.get("quantize") else "float")
    report = correct(correct_spec(ctx.recipe, model, out, resume))
    return {"final": report["final"], "train_seconds": report["train_seconds"], **_sizes(report["size"])}


def run_finetune(ctx: Context, out: Path, resume: bool) -> dict[str, Any]:
    report = finetune(finetune_spec(ctx.recipe, ctx.product(ctx.last_model()), out, resume))
    return {"examples": report["examples"], "final": report["final"], "train_seconds": report["train_seconds"],
            **_sizes(report["size"]), **({"offload": report["offload"]} if "offload" in report else {})}


def _sizes(size: dict[str, Any]) -> dict[str, Any]:
    return {k: size[k] for k in ("bits_per_weight", "bits_per_weight_with_adapter") if k in size}


def run_evaluate(ctx: Context, out: Path, resume: bool) -> dict[str, Any]:
    """Every model named in ``evaluate.models`` on every task; ranks apply to the finetuned model."""
    tasks = task_specs(ctx.recipe)
    results: dict[str, Any] = {}
    for name in ctx.recipe.get("evaluate")["models"] or [("finetuned" if ctx.recipe.get("finetune") else ctx.last_model())]:
        own = tasks if name == "finetuned" else [dataclasses.replace(t, ranks=None) for t in tasks]
        report = evaluate(eval_spec(ctx.recipe, ctx.product(name), own))
        results[name] = {"bits_per_weight": report["bits_per_weight"],
                         "bits_per_weight_with_adapter": report["bits_per_weight_with_adapter"], **report["tasks"]}
    atomic_write_json(out / "results.json", results)
    return results


def run_export(ctx: Context, out: Path, resume: bool) -> dict[str, Any]:
    run = ctx.product("finetuned" if ctx.recipe.get("finetune") else "corrected")
    return export(export_spec(ctx.recipe, run, out))


def run_sweep_stage(ctx: Context, out: Path, resume: bool) -> dict[str, Any]:
    from cluster.sweep import run_sweep

    spec = sweep_spec(ctx.recipe, out)
    rows = run_sweep(spec, ctx.recipe.get("cluster")["address"], resume=(out / "sweep.json").is_file())
    ok = [r for r in rows if r["status"] == "ok"]
    if len(ok) < len(rows):
        raise EngineError(f"{len(rows) - len(ok)} sweep trial(s) failed (see {out}/trials); run again to retry them")
    best = min(ok, key=lambda r: r["metric"])
    return {"trials": len(rows), "metric": spec.metric, "best": best, "results": str(out / "results.parquet")}


STAGE_RUNNERS: dict[str, Callable[[Context, Path, bool], dict[str, Any]]] = {
    "quantize": run_quantize, "correct": run_correct, "finetune": run_finetune, "sweep": run_sweep_stage,
    "evaluate": run_evaluate, "export": run_export,
}
RESUMABLE = ("correct", "finetune", "sweep")  # continue from checkpoints instead of starting over


# --------------------------------------------------------------------------------------------------
# The pipeline


def check_hardware(recipe: Recipe) -> dict[str, Any] | None:
    """The planner's verdict on the recipe's declared hardware (None without a hardware section);
    a recipe that does not fit is refused before anything runs."""
    if recipe.get("hardware") is None:
        return None
    result = plan(plan_spec(recipe, plan_shape(recipe)))
    if not result.fits:
        raise EngineError(f"hardware: the recipe does not fit its declared hardware: {result.verdict()}")
    return result.to_json()


def run_recipe(recipe: Recipe, echo: Callable[[str], None] = click.echo) -> dict[str, Any]:
    """Run every stage not already finished with the same inputs; returns the report.  The output folder is
    locked while the recipe runs (a second run into it is refused)."""
    with output_lock(recipe.output):
        return _run_stages(recipe, echo)


def _run_stages(recipe: Recipe, echo: Callable[[str], None]) -> dict[str, Any]:
    out = recipe.output
    out.mkdir(parents=True, exist_ok=True)
    (out / "stages").mkdir(exist_ok=True)
    atomic_write_json(out / "recipe.json", {"file": str(recipe.file), "name": recipe.name, **recipe.sections})
    ctx, prints = Context(recipe), fingerprints(recipe)
    records: dict[str, Any] = {}
    stages = recipe.stages
    start = time.perf_counter()
    for index, stage in enumerate(stages, 1):
        record_file = out / "stages" / f"{stage}.json"
        pending_file = out / "stages" / f"{stage}.pending"
        stage_dir = ctx.stage_dir(stage)
        record = json.loads(record_file.read_text()) if record_file.is_file() else None
        if record is not None and record["fingerprint"] == prints[stage] and stage_dir.is_dir():
            echo(f"[{index}/{len(stages)}] {stage}: finished earlier with the same inputs, skipped")
            records[stage] = {**record, "skipped": True}
            continue
        record_file.unlink(missing_ok=True)
        resume = (stage in RESUMABLE and stage_dir.is_dir() and pending_file.is_file()
                  and pending_file.read_text() == prints[stage])
        if stage_dir.exists() and not resume:
            shutil.rmtree(stage_dir)
        atomic_write_bytes(pending_file, prints[stage].encode())
        echo(f"[{index}/{len(stages)}] {stage}" + (": continuing from its last checkpoint" if resume else ""))
        PeakRss().reset()  # the high-water mark now covers this stage alone
        began = time.perf_counter()
        stage_dir.mkdir(parents=True, exist_ok=True)
        metrics = STAGE_RUNNERS[stage](ctx, stage_dir, resume)
        record = {"stage": stage, "fingerprint": prints[stage], "seconds": time.perf_counter() - began,
                  "peak_rss_bytes": status_bytes("VmHWM"), "output": str(stage_dir), "output_bytes": _bytes(stage_dir),
                  "metrics": metrics, "resumed": resume}
        atomic_write_json(record_file, record)
        pending_file.unlink()
        records[stage] = {**record, "skipped": False}
        echo(f"      {stage}: {record['seconds']:.1f} s, peak RSS {record['peak_rss_bytes'] / 2**20:.0f} MiB")
        _write_report(recipe, records, stages, time.perf_counter() - start)
    return _write_report(recipe, records, stages, time.perf_counter() - start)


def _bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _write_report(recipe: Recipe, records: dict[str, Any], stages: list[str], seconds: float) -> dict[str, Any]:
    report = {"recipe": str(recipe.file), "name": recipe.name, "output": str(recipe.output),
              "finished": all(s in records for s in stages), "stages": records,
              "seconds_this_run": seconds, "seconds_all_stages": sum(r["seconds"] for r in records.values())}
    atomic_write_json(recipe.output / "report.json", report)
    atomic_write_bytes(recipe.output / "report.md", render_markdown(report).encode())
    return report
