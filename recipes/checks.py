"""What no single key can say: combinations of sections that cannot run.  Each stage's own rules are its spec's
(made here once with placeholder outputs, so they are checked before anything runs); what is left are the rules
between stages."""

from __future__ import annotations

from pathlib import Path

from engine.errors import EngineError
from engine.model import is_quantized_dir
from engine.offload import BUILTIN_CONFIGS
from engine.pipelines import GGUF_METHOD

from recipes.schema import PRODUCTS, STAGES, Recipe
from recipes.specs import (
    correct_spec, export_spec, finetune_spec, hardware_spec, plan_spec, quantize_spec, sweep_spec, task_specs, text_task,
)


def check_recipe(recipe: Recipe) -> None:
    if not any(recipe.get(s) for s in STAGES):
        raise EngineError("recipe: no stage to run; add one of quantize, correct, finetune, evaluate, export")
    _make_stage_specs(recipe)
    _check_stages(recipe)
    _check_finetune(recipe)
    _check_evaluate(recipe)
    _check_export(recipe)
    _check_cluster(recipe)
    if recipe.sweep is not None:
        sweep_spec(recipe, recipe.output / "sweep")
    _check_hardware(recipe)


def _make_stage_specs(recipe: Recipe) -> None:
    """Each stage's spec, so its settings and their combinations are checked as the use case will see them."""
    out, model = recipe.output, recipe.get("model")["path"]
    if recipe.get("quantize"):
        quantize_spec(recipe, out / "quantized")
    if recipe.get("correct"):
        correct_spec(recipe, model, out / "corrected", resume=False)
    if recipe.get("finetune"):
        finetune_spec(recipe, model, out / "finetuned", resume=False)
    if recipe.get("evaluate"):
        task_specs(recipe)
    if recipe.get("export"):
        export_spec(recipe, str(out / "finetuned"), out / "export")


def _check_stages(recipe: Recipe) -> None:
    if recipe.get("offload") is not None and recipe.get("finetune") is None:
        raise EngineError("offload: streams weights during a finetune; add a finetune section")
    if recipe.get("correct") is None:
        return
    if recipe.get("quantize") is None and not is_quantized_dir(recipe.get("model")["path"]):
        raise EngineError("correct: needs a quantized model; add a quantize section or point model.path at one")
    if recipe.sweep is not None:
        raise EngineError("correct: a cluster sweep runs quantize -> finetune -> evaluate per grid point; "
                          "remove correct or cluster.sweep")


def adapter_rank(recipe: Recipe) -> int:
    lora = recipe.get("finetune")["lora"]
    return lora["rank_max"] if lora["dynamic"] else lora["rank"]


def _check_finetune(recipe: Recipe) -> None:
    f, correct = recipe.get("finetune"), recipe.get("correct")
    if f is None or correct is None:
        return
    if adapter_rank(recipe) != correct["rank"]:
        key = "rank_max" if f["lora"]["dynamic"] else "rank"
        raise EngineError(f"finetune.lora.{key}: {adapter_rank(recipe)} differs from correct.rank {correct['rank']}; "
                          "a finetune after correct trains the correction adapter further, at its rank")


def _check_evaluate(recipe: Recipe) -> None:
    e = recipe.get("evaluate")
    if e is None:
        return
    for i, name in enumerate(e["models"] or []):
        stage = PRODUCTS[name]
        if stage is not None and recipe.get(stage) is None:
            raise EngineError(f"evaluate.models[{i}]: {name!r} needs a {stage} section")
    for i, task in enumerate(e["tasks"]):
        if task["ranks"] is None:
            continue
        where, f = f"evaluate.tasks[{i}].ranks", recipe.get("finetune")
        if f is None or not f["lora"]["dynamic"]:
            raise EngineError(f"{where}: ranks need a dynamic-rank finetune (finetune.lora.dynamic: true)")
        if f["lora"]["rank_max"] is not None and max(task["ranks"]) > f["lora"]["rank_max"]:
            raise EngineError(f"{where}: {max(task['ranks'])} is above finetune.lora.rank_max {f['lora']['rank_max']}")


def _check_export(recipe: Recipe) -> None:
    x = recipe.get("export")
    if x is None:
        return
    if recipe.get("finetune") is None and recipe.get("correct") is None:
        raise EngineError("export: needs an adapter to export; add a finetune or correct section")
    if recipe.sweep is not None:
        raise EngineError("export: a cluster sweep leaves one run per grid point; export the one you pick by hand")
    if x["rank"] is not None:
        f = recipe.get("finetune")
        if f is None or not f["lora"]["dynamic"]:
            raise EngineError("export.rank: cutting to a rank needs a dynamic-rank finetune (finetune.lora.dynamic)")
        if f["lora"]["rank_max"] is not None and x["rank"] > f["lora"]["rank_max"]:
            raise EngineError(f"export.rank: {x['rank']} is above finetune.lora.rank_max {f['lora']['rank_max']}")


def _check_cluster(recipe: Recipe) -> None:
    c = recipe.get("cluster")
    if c is None:
        return
    q = recipe.get("quantize")
    if c["calibrate_workers"] is not None and (q is None or q["calib"] is None):
        raise EngineError("cluster.calibrate_workers: calibration runs on Ray only for a calibrated "
                          "quantize method (optq, quip) with quantize.calib")
    if c["train_workers"] is not None and recipe.get("finetune") is None and recipe.get("correct") is None:
        raise EngineError("cluster.train_workers: spreads the finetune and correct stages over Ray Train workers; "
                          "the recipe has neither")
    if recipe.sweep is None:
        return
    if c["train_workers"] is not None:
        raise EngineError("cluster.train_workers: a sweep runs one process per trial; remove one of the two")
    if q is None or recipe.get("finetune") is None:
        raise EngineError("cluster.sweep: a sweep quantizes and finetunes each grid point; "
                          "it needs quantize and finetune sections")
    if text_task(recipe) is None:
        raise EngineError("cluster.sweep: needs an evaluate task with format text (the metric every trial reports)")
    if recipe.get("offload") is not None:
        raise EngineError("cluster.sweep: trials run without offload; remove the offload section")


def _check_hardware(recipe: Recipe) -> None:
    if recipe.get("hardware") is None:
        return
    if recipe.get("finetune") is None:
        raise EngineError("hardware: the planner checks a finetune; add a finetune section")
    q = recipe.get("quantize")
    if q is None or q["method"] == GGUF_METHOD:
        raise EngineError("hardware: the planner needs quantize.method and quantize.bits")
    hardware_spec(recipe)
    plan_spec(recipe, plan_shape(recipe))


def plan_shape(recipe: Recipe) -> str:
    """The model shape the planner reads: ``model.shape`` (a built-in name or config.json), else the
    model directory's own config.json."""
    m = recipe.get("model")
    if m["shape"] is not None:
        if m["shape"] in BUILTIN_CONFIGS:
            return m["shape"]
        path = Path(recipe.file.parent, m["shape"]).resolve()
        if not path.exists():
            raise EngineError(f"model.shape: {m['shape']!r} is neither a built-in shape "
                              f"({', '.join(BUILTIN_CONFIGS)}) nor a config.json")
        return str(path)
    if (Path(m["path"]) / "config.json").is_file():
        return m["path"]
    raise EngineError(f"model.shape: needed for the hardware plan; one of {', '.join(BUILTIN_CONFIGS)} "
                      "or a config.json")
