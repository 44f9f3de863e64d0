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

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import fields
from pathlib import Path
from typing import Any

import click

from engine.errors import EngineError
from engine.procstat import PeakRss, status_bytes
from engine.storage import atomic_write_bytes, atomic_write_json

from recipes.schema import GGUF_METHOD, PRODUCTS, Recipe, adapter_rank, plan_settings, quantizer_options, sweep_config

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


def _train_config(train: dict[str, Any], **extra: Any) -> Any:
    from engine.train import TrainConfig

    names = {f.name for f in fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in train.items() if k in names}, **extra)
    config.validate()
    return config


def _alpha(rank: int, alpha: float | None) -> float:
    return alpha if alpha is not None else 2.0 * rank  # the CLI's default: 2 x rank


def run_quantize(ctx: Context, out: Path, resume: bool) -> dict[str, Any]:
    from engine.model import read_manifest

    q, source = ctx.recipe.get("quantize"), ctx.recipe.get("model")["path"]
    if q["method"] == GGUF_METHOD:
        from engine.model import save_quantized
        from engine.model.gguf_quantized import load_gguf_quantized

        model, tokenizer, manifest = load_gguf_quantized(source)
        save_quantized(model, tokenizer, out, {k: manifest[k] for k in ("source_model", "quantizer")})
    else:
        from engine.cli import quantize_to_dir

        calib = q["calib"] or {}
        cluster = ctx.recipe.get("cluster") or {}
        workers = cluster.get("calibrate_workers")
        runner_factory, session = None, nullcontext()
        if workers:
            from cluster.calibrate import runner_factory as ray_runner_factory
            from cluster.runtime import ray_session

            session = ray_session(cluster.get("address"), num_cpus=None if cluster.get("address")
                                  else workers * cluster["threads"])
            runner_factory = ray_runner_factory(source, workers, cluster["threads"])
        options = {"bits": None, **quantizer_options(q)}
        with session:
            quantize_to_dir(source, q["method"], calib.get("file"), calib.get("mode"), calib.get("windows"),
                            calib.get("asym_alpha"), calib.get("seed"), str(out), runner_factory, **options)
    manifest = read_manifest(out)
    return {"bits_per_weight": manifest["size"]["bits_per_weight"], "model_bytes": manifest["size"]["model_bytes"],
            "quantizer": manifest.get("quantizer", {})}


def run_correct(ctx: Context, out: Path, resume: bool) -> dict[str, Any]:
    from engine.train.runs import correct

    c = ctx.recipe.get("correct")
    report = correct(
        ctx.product("quantized" if ctx.recipe.get("quantize") else "float"), c["calib"], out,
        _train_config(c["train"]), teacher=c["teacher"], rank=c["rank"], alpha=_alpha(c["rank"], c["alpha"]),
        init=c["init"], loftq_iters=c["loftq_iters"], ce_weight=c["ce_weight"], seq_len=c["seq_len"],
        limit=c["limit"], resume=resume,
    )
    return {"final": report["final"], "train_seconds": report["train_seconds"], **_sizes(report["size"])}


def run_finetune(ctx: Context, out: Path, resume: bool) -> dict[str, Any]:
    from engine.data import FormatSpec
    from engine.train.runs import finetune

    f, offload = ctx.recipe.get("finetune"), ctx.recipe.get("offload") or {}
    data, lora = f["data"], f["lora"]
    config = _train_config(f["train"], rank_max=lora["rank_max"], dynamic_frozen=lora["frozen"],
                           offload_optimizer=offload.get("optimizer", False))
    rank = adapter_rank(ctx.recipe)
    report = finetune(
        ctx.product(ctx.last_model()), data["file"],
        FormatSpec(data["format"], data["columns"], data["template"], data["label_words"]), out, config,
        rank=rank, alpha=_alpha(rank, lora["alpha"]), seq_len=data["seq_len"], limit=data["limit"], dtype=f["dtype"],
        eval_data=f["eval_data"], resume=resume, offload=offload.get("tier"),
        offload_dir=offload.get("dir"), prefetch=offload.get("prefetch", 1),
    )
    return {"examples": report["examples"], "final": report["final"], "train_seconds": report["train_seconds"],
            **_sizes(report["size"]), **({"offload": report["offload"]} if "offload" in report else {})}


def _sizes(size: dict[str, Any]) -> dict[str, Any]:
    return {k: size[k] for k in ("bits_per_weight", "bits_per_weight_with_adapter") if k in size}


def run_evaluate(ctx: Context, out: Path, resume: bool) -> dict[str, Any]:
    from engine.data import FormatSpec, check_data
    from engine.eval.tasks import task_metric
    from engine.model import model_size
    from engine.train import set_active_rank
    from engine.train.runs import load_with_adapter

    e = ctx.recipe.get("evaluate")
    tasks = e["tasks"]
    specs = [FormatSpec(t["format"], t["columns"], t["template"], t["label_words"]) for t in tasks]
    for task, spec in zip(tasks, specs):
        check_data(task["file"], spec)
    results: dict[str, Any] = {}
    for name in e["models"] or [("finetuned" if ctx.recipe.get("finetune") else ctx.last_model())]:
        model, tokenizer, _ = load_with_adapter(ctx.product(name))
        size = model_size(model)
        entry: dict[str, Any] = {"bits_per_weight": size["bits_per_weight"],
                                 "bits_per_weight_with_adapter": size["bits_per_weight_with_adapter"]}
        for task, spec in zip(tasks, specs):
            metric = task_metric(task["format"], task["file"], tokenizer, spec, task["limit"], task["seq_len"],
                                 task["batch_size"], progress=True)
            label = task["name"] or Path(task["file"]).stem
            if task["ranks"] and name == "finetuned":
                per_rank = {}
                for rank in task["ranks"]:
                    set_active_rank(model, rank)
                    per_rank[str(rank)] = metric(model)
                set_active_rank(model, None)
                entry[label] = {"ranks": per_rank}
            else:
                entry[label] = metric(model)
        results[name] = entry
    atomic_write_json(out / "results.json", results)
    return results


def run_export(ctx: Context, out: Path, resume: bool) -> dict[str, Any]:
    from engine.train.runs import export_run

    x = ctx.recipe.get("export")
    run_dir = ctx.product("finetuned" if ctx.recipe.get("finetune") else "corrected")
    return export_run(run_dir, out, x["rank"], x["merged"])


def run_sweep_stage(ctx: Context, out: Path, resume: bool) -> dict[str, Any]:
    from cluster.sweep import run_sweep

    config_file = out / "sweep.yaml"
    if not config_file.is_file():
        import yaml

        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(config_file, yaml.safe_dump(sweep_config(ctx.recipe), sort_keys=False).encode())
    cluster = ctx.recipe.get("cluster")
    config, rows = run_sweep(config_file, out, cluster["address"], resume=(out / "sweep.json").is_file())
    ok = [r for r in rows if r["status"] == "ok"]
    if len(ok) < len(rows):
        raise EngineError(f"{len(rows) - len(ok)} sweep trial(s) failed (see {out}/trials); run again to retry them")
    best = min(ok, key=lambda r: r["metric"])
    return {"trials": len(rows), "metric": config.metric, "best": best, "results": str(out / "results.parquet")}


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
    from engine.offload.plan import PlanInputs, make_plan
    from engine.offload.shapes import load_config, model_shapes

    settings = plan_settings(recipe)
    shapes = model_shapes(load_config(settings.pop("model")))
    plan = make_plan(PlanInputs(shapes, **settings))
    if not plan.fits:
        raise EngineError(f"hardware: the recipe does not fit its declared hardware: {plan.verdict()}")
    return plan.to_json()


def run_recipe(recipe: Recipe, echo: Callable[[str], None] = click.echo) -> dict[str, Any]:
    """Run every stage not already finished with the same inputs; returns the report."""
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
    from recipes.report import render_markdown

    report = {"recipe": str(recipe.file), "name": recipe.name, "output": str(recipe.output),
              "finished": all(s in records for s in stages), "stages": records,
              "seconds_this_run": seconds, "seconds_all_stages": sum(r["seconds"] for r in records.values())}
    atomic_write_json(recipe.output / "report.json", report)
    atomic_write_bytes(recipe.output / "report.md", render_markdown(report).encode())
    return report
