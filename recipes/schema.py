"""The recipe schema: a YAML pipeline read, checked and completed before any stage runs.

A recipe names a model and the stages to put it through, in this order::

    quantize -> correct -> finetune (or a cluster sweep) -> evaluate -> export

plus where the weights live while training (``offload``), the machine it is
meant for (``hardware``, checked by the planner) and the Ray cluster
(``cluster``).  Every key is known: a typo is refused with the closest valid
key, a wrong type, range or combination with one line naming the key path, so
nothing runs on a recipe that would fail an hour in.  Paths are relative to the
recipe file; ``{shared}`` is the shared models and data folder.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import EngineError
from engine.validate import (
    REQUIRED, Keys, boolean, choice, file, integer, listof, load_yaml, mapping, model, number, section,
    string, string_map,
)

STAGES = ("quantize", "correct", "finetune", "evaluate", "export")
# The model each stage leaves behind, by the name ``evaluate.models`` uses.
PRODUCTS = {"float": None, "quantized": "quantize", "corrected": "correct", "finetuned": "finetune"}
BITS = (2, 3, 4, 8)
GGUF_METHOD = "gguf"  # keep the quants of an already-quantized GGUF file


@dataclass(frozen=True)
class Recipe:
    """A validated recipe: every section complete with defaults, every path absolute.

    ``sections`` maps each section given (and ``model``) to its checked
    settings; stages absent from the recipe are absent from it.
    """

    file: Path
    name: str
    output: Path
    sections: dict[str, Any]

    def get(self, name: str) -> Any:
        return self.sections.get(name)

    @property
    def stages(self) -> list[str]:
        """The stages to run, in order; a cluster sweep is one stage that quantizes, finetunes and
        evaluates every grid point."""
        if self.sweep is not None:
            return ["sweep"]
        return [s for s in STAGES if s in self.sections]

    @property
    def sweep(self) -> dict[str, Any] | None:
        cluster = self.get("cluster")
        return cluster["sweep"] if cluster else None


# --------------------------------------------------------------------------------------------------
# Sections


def _size(value: Any, where: str) -> int:
    from engine.offload.plan import parse_size

    return parse_size(string(str(value), where), where)


def _train_keys() -> Keys:
    from engine.train.trainer import OPTIMIZERS

    return {
        "steps": (integer(1), 100),
        "batch_size": (integer(1), 8),
        "grad_accum": (integer(1), 1),
        "lr": (number(), 3e-3),
        "warmup_steps": (integer(0), 10),
        "min_lr_ratio": (number(0.0, 1.0, exclusive=False), 0.1),
        "weight_decay": (number(0.0, exclusive=False), 0.0),
        "max_grad_norm": (number(), 1.0),
        "optimizer": (choice(OPTIMIZERS), "adamw"),
        "grad_checkpointing": (boolean, False),
        "seed": (integer(0), 0),
        "eval_every": (integer(0), 0),
        "save_every": (integer(0), 10),
        "keep_last": (integer(1), 2),
    }


def _data_keys(base: Path, formats: tuple[str, ...]) -> Keys:
    return {
        "file": (file(base), REQUIRED),
        "format": (choice(formats), "text"),
        "columns": (string_map, {}),
        "label_words": (string_map, {}),
        "template": (string, None),
        "limit": (integer(1), None),
        "seq_len": (integer(2), 256),
    }


def _top_keys(base: Path) -> Keys:
    from engine.data import FORMATS
    from engine.offload import TIERS
    from engine.quant import QUANTIZERS

    lora = {"rank": (integer(1), 8), "alpha": (number(), None), "dynamic": (boolean, False),
            "rank_max": (integer(1), None), "frozen": (boolean, False)}
    return {
        "name": (string, None),
        "description": (string, None),
        "output": (string, None),
        "model": (mapping({"path": (model(base), REQUIRED), "shape": (string, None)}), REQUIRED),
        "quantize": (mapping({
            "method": (choice((*QUANTIZERS, GGUF_METHOD)), "rtn"),
            "bits": (choice(BITS), None),
            "group_size": (integer(-1), None),
            "symmetric": (boolean, None),
            "act_order": (boolean, None),
            "static_groups": (boolean, None),
            "clip_search": (boolean, None),
            "damp": (number(), None),
            "incoherence": (string, None),
            "calib": (mapping({
                "file": (file(base), REQUIRED),
                "windows": (integer(1), None),
                "mode": (choice(("sequential", "independent")), None),
                "asym_alpha": (number(0.0, 1.0, exclusive=False), None),
                "seed": (integer(0), None),
            }), None),
        }), None),
        "correct": (mapping({
            "calib": (file(base), REQUIRED),
            "teacher": (model(base), None),
            "rank": (integer(1), 8),
            "alpha": (number(), None),
            "init": (choice(("loftq", "zero")), "loftq"),
            "loftq_iters": (integer(1), 4),
            "ce_weight": (number(0.0, exclusive=False), 1.0),
            "limit": (integer(1), None),
            "seq_len": (integer(2), 256),
            "train": (mapping(_train_keys()), {}),
        }), None),
        "finetune": (mapping({
            "data": (mapping(_data_keys(base, FORMATS)), REQUIRED),
            "eval_data": (file(base), None),
            "lora": (mapping(lora), {}),
            "dtype": (choice(("float32", "bfloat16")), "float32"),
            "train": (mapping(_train_keys()), {}),
        }), None),
        "evaluate": (mapping({
            "models": (listof(choice(tuple(PRODUCTS))), None),
            "tasks": (listof(mapping({
                "name": (string, None),
                **_data_keys(base, ("text", "classification", "summarization")),
                "batch_size": (integer(1), 8),
                "ranks": (listof(integer(1)), None),
            })), REQUIRED),
        }), None),
        "export": (mapping({"rank": (integer(1), None), "merged": (boolean, False)}), None),
        "offload": (mapping({
            "tier": (choice(TIERS), "host"),
            "dir": (string, None),
            "prefetch": (integer(0), 1),
            "optimizer": (boolean, False),
        }), None),
        "hardware": (mapping({
            "device": (choice(("cuda", "cpu")), "cuda"),
            "device_mem": (_size, None),
            "host_mem": (_size, REQUIRED),
            "disk_gbps": (number(), 1.0),
            "h2d_gbps": (number(), 25.0),
            "tflops": (number(), 150.0),
            "dequant_gweights": (number(), 50.0),
        }), None),
        "cluster": (mapping({
            "address": (string, None),
            "calibrate_workers": (integer(1), None),
            "threads": (integer(1), 1),
            "sweep": (mapping({
                "grid": (mapping({
                    "method": (listof(choice(tuple(QUANTIZERS))), None),
                    "bits": (listof(choice(BITS)), None),
                    "group_size": (listof(integer(-1)), None),
                    "rank": (listof(integer(1)), None),
                    "lr": (listof(number()), None),
                }), {}),
                "metric": (choice(("eval_ppl", "eval_nll")), "eval_ppl"),
                "eval_windows": (integer(1), 64),
                "cpus_per_trial": (integer(1), 1),
                "max_failures": (integer(0), 2),
            }), None),
        }), None),
    }


# --------------------------------------------------------------------------------------------------
# Reading


def parse_override(text: str) -> tuple[list[str], Any]:
    """``finetune.lora.rank=16`` as (key path, value); the value is read as YAML (``16``, ``true``, ``[1, 2]``)."""
    import yaml

    key, sep, value = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise EngineError(f"override {text!r}: expected KEY.PATH=VALUE, e.g. finetune.lora.rank=16")
    try:
        return parts, yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        raise EngineError(f"override {text!r}: the value is not valid YAML") from None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``raw`` with each ``key.path=value`` set (missing sections created, list items by index:
    ``evaluate.tasks.0.limit=10``); validation comes after."""
    raw = copy.deepcopy(raw)
    for text in overrides:
        parts, value = parse_override(text)
        node: Any = raw
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            if isinstance(node, list) and part.isdigit() and int(part) < len(node):
                key: Any = int(part)
            elif isinstance(node, dict):
                key = part
            else:
                raise EngineError(f"override {text!r}: {'.'.join(parts[:depth])} is not a section")
            if last:
                node[key] = value
            else:
                if isinstance(node, dict) and node.get(key) is None:
                    node[key] = {}
                node = node[key]
    return raw


def load_recipe(recipe_file: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a recipe; any problem is one EngineError line naming the key path."""
    recipe_file = Path(recipe_file)
    raw = load_yaml(recipe_file)
    if not isinstance(raw, dict):
        raise EngineError(f"{recipe_file}: a recipe is a mapping of sections (model, quantize, ...), "
                          f"got {type(raw).__name__}")
    raw = apply_overrides(raw, list(overrides))
    base = recipe_file.resolve().parent
    sections = {k: v for k, v in section(raw, "", _top_keys(base)).items() if v is not None}
    name = sections.pop("name", None) or recipe_file.stem
    output = Path(sections.pop("output", None) or Path("runs") / name).resolve()
    sections.pop("description", None)
    recipe = Recipe(recipe_file.resolve(), name, output, sections)
    _check(recipe)
    return recipe


# --------------------------------------------------------------------------------------------------
# Combinations


def _check(recipe: Recipe) -> None:
    """What no single key can say: combinations of sections and settings that cannot run."""
    if not any(recipe.get(s) for s in STAGES):
        raise EngineError("recipe: no stage to run; add one of quantize, correct, finetune, evaluate, export")
    _check_quantize(recipe)
    _check_correct(recipe)
    _check_finetune(recipe)
    _check_evaluate(recipe)
    _check_export(recipe)
    _check_offload(recipe)
    _check_cluster(recipe)
    _check_hardware(recipe)


def quantizer_options(settings: dict[str, Any]) -> dict[str, Any]:
    """The quantizer's constructor options among ``settings`` (those given)."""
    return {k: v for k, v in settings.items() if k not in ("method", "calib") and v is not None}


def _check_quantize(recipe: Recipe) -> None:
    from engine.model import is_quantized_dir
    from engine.model.gguf_quantized import is_quantized_gguf
    from engine.quant import QUANTIZERS, make_quantizer

    q, path = recipe.get("quantize"), recipe.sections["model"]["path"]
    if q is None:
        return
    if is_quantized_dir(path):
        raise EngineError(f"quantize: model.path {path} is already a quantized directory; remove the quantize section")
    method = q["method"]
    if method == GGUF_METHOD:
        given = list(quantizer_options(q)) + (["calib"] if q["calib"] else [])
        if given:
            raise EngineError(f"quantize.{given[0]}: method 'gguf' keeps the file's own quants and takes no settings")
        if not (Path(path).is_file() and is_quantized_gguf(path)):
            raise EngineError(f"quantize.method: 'gguf' needs model.path to be a GGUF file with quantized "
                              f"weights, but {path} holds float weights; pick rtn, optq, quip, nf4, hqq, ...")
        return
    accepted = inspect.signature(QUANTIZERS[method]).parameters
    for key in quantizer_options(q):
        if key not in accepted:
            raise EngineError(f"quantize.{key}: method {method!r} does not take it; it takes {', '.join(accepted)}")
    try:
        quantizer = make_quantizer(method, **quantizer_options(q))
    except EngineError as exc:
        raise EngineError(f"quantize: {exc}") from None
    if quantizer.needs_calibration and q["calib"] is None:
        raise EngineError(f"quantize.calib: method {method!r} needs calibration data: add calib: {{file: ...}}")
    if not quantizer.needs_calibration and q["calib"] is not None:
        raise EngineError(f"quantize.calib: method {method!r} does not use calibration data; remove it")


def _check_correct(recipe: Recipe) -> None:
    from engine.model import is_quantized_dir

    c = recipe.get("correct")
    if c is None:
        return
    if recipe.get("quantize") is None and not is_quantized_dir(recipe.sections["model"]["path"]):
        raise EngineError("correct: needs a quantized model; add a quantize section or point model.path at one")
    if recipe.sweep is not None:
        raise EngineError("correct: a cluster sweep runs quantize -> finetune -> evaluate per grid point; "
                          "remove correct or cluster.sweep")


def _check_finetune(recipe: Recipe) -> None:
    f = recipe.get("finetune")
    if f is None:
        return
    lora, data = f["lora"], f["data"]
    if lora["dynamic"] and lora["rank_max"] is None:
        raise EngineError("finetune.lora.rank_max: required when finetune.lora.dynamic is true (ranks 1..rank_max)")
    if lora["rank_max"] is not None and not lora["dynamic"]:
        raise EngineError("finetune.lora.rank_max: only for a dynamic-rank run; set finetune.lora.dynamic: true")
    if lora["frozen"] and not lora["dynamic"]:
        raise EngineError("finetune.lora.frozen: a QDyLoRA variant; it needs finetune.lora.dynamic: true")
    correct = recipe.get("correct")
    if correct is not None and adapter_rank(recipe) != correct["rank"]:
        key = "rank_max" if lora["dynamic"] else "rank"
        raise EngineError(f"finetune.lora.{key}: {adapter_rank(recipe)} differs from correct.rank {correct['rank']}; "
                          "a finetune after correct trains the correction adapter further, at its rank")
    if data["format"] == "classification" and not data["label_words"]:
        raise EngineError("finetune.data.label_words: a classification set needs its label words, e.g. {0: negative}")
    if f["eval_data"] is None and f["train"]["eval_every"]:
        raise EngineError("finetune.train.eval_every: needs finetune.eval_data")


def adapter_rank(recipe: Recipe) -> int:
    lora = recipe.get("finetune")["lora"]
    return lora["rank_max"] if lora["dynamic"] else lora["rank"]


def _check_evaluate(recipe: Recipe) -> None:
    e = recipe.get("evaluate")
    if e is None:
        return
    for i, name in enumerate(e["models"] or []):
        stage = PRODUCTS[name]
        if stage is not None and recipe.get(stage) is None:
            raise EngineError(f"evaluate.models[{i}]: {name!r} needs a {stage} section")
    for i, task in enumerate(e["tasks"]):
        where = f"evaluate.tasks[{i}]"
        if task["format"] == "classification" and not task["label_words"]:
            raise EngineError(f"{where}.label_words: a classification set needs its label words, e.g. {{0: negative}}")
        if task["ranks"] is not None:
            f = recipe.get("finetune")
            if f is None or not f["lora"]["dynamic"]:
                raise EngineError(f"{where}.ranks: ranks need a dynamic-rank finetune (finetune.lora.dynamic: true)")
            if max(task["ranks"]) > f["lora"]["rank_max"]:
                raise EngineError(f"{where}.ranks: {max(task['ranks'])} is above finetune.lora.rank_max "
                                  f"{f['lora']['rank_max']}")


def _check_export(recipe: Recipe) -> None:
    e = recipe.get("export")
    if e is None:
        return
    if recipe.get("finetune") is None and recipe.get("correct") is None:
        raise EngineError("export: needs an adapter to export; add a finetune or correct section")
    if recipe.sweep is not None:
        raise EngineError("export: a cluster sweep leaves one run per grid point; export the one you pick by hand")
    if e["rank"] is not None:
        f = recipe.get("finetune")
        if f is None or not f["lora"]["dynamic"]:
            raise EngineError("export.rank: cutting to a rank needs a dynamic-rank finetune (finetune.lora.dynamic)")
        if e["rank"] > f["lora"]["rank_max"]:
            raise EngineError(f"export.rank: {e['rank']} is above finetune.lora.rank_max {f['lora']['rank_max']}")


def _check_offload(recipe: Recipe) -> None:
    o = recipe.get("offload")
    if o is None:
        return
    if recipe.get("finetune") is None:
        raise EngineError("offload: streams weights during a finetune; add a finetune section")
    if o["optimizer"] and recipe.get("finetune")["train"]["optimizer"] != "cpu_adam":
        raise EngineError("offload.optimizer: keeping optimizer state on the host needs "
                          "finetune.train.optimizer: cpu_adam")
    if o["dir"] is not None and o["tier"] != "disk":
        raise EngineError(f"offload.dir: only the disk tier keeps block files, but offload.tier is {o['tier']!r}")


def _check_cluster(recipe: Recipe) -> None:
    c = recipe.get("cluster")
    if c is None:
        return
    q = recipe.get("quantize")
    if c["calibrate_workers"] is not None:
        if q is None or q["calib"] is None:
            raise EngineError("cluster.calibrate_workers: calibration runs on Ray only for a calibrated "
                              "quantize method (optq, quip) with quantize.calib")
    sweep = c["sweep"]
    if sweep is None:
        return
    f, e = recipe.get("finetune"), recipe.get("evaluate")
    if q is None or f is None:
        raise EngineError("cluster.sweep: a sweep quantizes and finetunes each grid point; "
                          "it needs quantize and finetune sections")
    if f["data"]["format"] != "text":
        raise EngineError(f"cluster.sweep: sweeps train on text; finetune.data.format is {f['data']['format']!r}")
    if e is None or not any(t["format"] == "text" for t in e["tasks"]):
        raise EngineError("cluster.sweep: needs an evaluate task with format text (the metric every trial reports)")
    if recipe.get("offload") is not None:
        raise EngineError("cluster.sweep: trials run without offload; remove the offload section")
    if f["lora"]["dynamic"] and sweep["grid"]["rank"] and max(sweep["grid"]["rank"]) > f["lora"]["rank_max"]:
        raise EngineError(f"cluster.sweep.grid.rank: {max(sweep['grid']['rank'])} is above finetune.lora.rank_max")
    from engine.quant import make_quantizer

    for i, method in enumerate(sweep["grid"]["method"] or [q["method"]]):
        if make_quantizer(method).needs_calibration and q["calib"] is None:
            raise EngineError(f"cluster.sweep.grid.method[{i}]: {method!r} needs quantize.calib")
    from cluster.sweep import read_config

    try:
        read_config(sweep_config(recipe), recipe.file.parent)
    except EngineError as exc:
        raise EngineError(f"cluster.sweep: {exc}") from None


def _check_hardware(recipe: Recipe) -> None:
    h = recipe.get("hardware")
    if h is None:
        return
    if h["device"] == "cuda" and h["device_mem"] is None:
        raise EngineError("hardware.device_mem: required for device cuda, e.g. 24GiB")
    if recipe.get("finetune") is None:
        raise EngineError("hardware: the planner checks a finetune; add a finetune section")
    q = recipe.get("quantize")
    if q is None or q["method"] == GGUF_METHOD:
        raise EngineError("hardware: the planner needs quantize.method and quantize.bits")
    plan_shape(recipe)  # raises if the shape cannot be known


def plan_shape(recipe: Recipe) -> str:
    """The model shape the planner reads: ``model.shape`` (a built-in name or config.json), else the
    model directory's own config.json."""
    from engine.offload.shapes import BUILTIN_CONFIGS

    m = recipe.sections["model"]
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


def plan_settings(recipe: Recipe) -> dict[str, Any]:
    """The planner's inputs for this recipe on its declared hardware (``PlanInputs`` fields, with the
    model shape's name in ``model``)."""
    q, f, h = recipe.get("quantize"), recipe.get("finetune"), recipe.get("hardware")
    o = recipe.get("offload") or {}
    grid_bits = recipe.sweep["grid"]["bits"] if recipe.sweep else None  # a sweep must fit at its widest
    group = q["group_size"] if q["group_size"] is not None else method_default(q["method"], "group_size")
    settings = {
        "model": plan_shape(recipe),
        "bits": max(grid_bits) if grid_bits else q["bits"] or method_default(q["method"], "bits"),
        "rank": adapter_rank(recipe),
        "seq_len": f["data"]["seq_len"],
        "batch": f["train"]["batch_size"],
        "device_mem": h["device_mem"] if h["device_mem"] is not None else h["host_mem"],
        "host_mem": h["host_mem"],
        "group_size": group if group is not None else 64,
        "tier": o.get("tier", "auto"),
        "prefetch": o.get("prefetch", 1),
        "compute_dtype": "bfloat16" if h["device"] == "cuda" else f["dtype"],
        "optimizer_offload": "yes" if o.get("optimizer") else "auto",
        "device": h["device"],
    }
    return {**settings, **{k: h[k] for k in ("disk_gbps", "h2d_gbps", "tflops", "dequant_gweights")}}


def plan_arguments(recipe: Recipe) -> list[str]:
    """The ``modulora plan`` command line that checks this recipe against its declared hardware."""
    args = []
    for key, value in plan_settings(recipe).items():
        if key.endswith("_mem"):
            value = f"{value / 2**30:g}GiB"
        args += [f"--{key.replace('_', '-')}", f"{value:g}" if isinstance(value, float) else str(value)]
    return args


def method_default(method: str, option: str) -> Any:
    from engine.quant import QUANTIZERS

    parameter = inspect.signature(QUANTIZERS[method]).parameters.get(option)
    return None if parameter is None else parameter.default


def sweep_config(recipe: Recipe) -> dict[str, Any]:
    """The ``modulora sweep`` config of a recipe's ``cluster.sweep``: the grid's axes default to the
    recipe's own quantize and finetune settings."""
    q, f, sweep = recipe.get("quantize"), recipe.get("finetune"), recipe.sweep
    task = next(t for t in recipe.get("evaluate")["tasks"] if t["format"] == "text")
    grid, lora, train = sweep["grid"], f["lora"], f["train"]
    method = grid["method"] or [q["method"]]
    group = q["group_size"] if q["group_size"] is not None else method_default(method[0], "group_size")
    config: dict[str, Any] = {
        "model": recipe.get("model")["path"],
        "data": f["data"]["file"],
        "eval_data": task["file"],
        "grid": {
            "method": method,
            "bits": grid["bits"] or [q["bits"] or method_default(method[0], "bits")],
            "group_size": grid["group_size"] or [group if group is not None else -1],
            "lr": grid["lr"] or [train["lr"]],
        },
        "finetune": {"steps": train["steps"], "batch_size": train["batch_size"], "seq_len": f["data"]["seq_len"],
                     "warmup_steps": train["warmup_steps"], "seed": train["seed"], "save_every": train["save_every"]},
        "metric": sweep["metric"],
        "eval_windows": task["limit"] or sweep["eval_windows"],
        "eval_seq_len": task["seq_len"],
        "resources_per_trial": {"cpu": sweep["cpus_per_trial"]},
        "max_failures": sweep["max_failures"],
    }
    if f["data"]["limit"] is not None:
        config["finetune"]["limit"] = f["data"]["limit"]
    if lora["dynamic"]:
        config["dynamic"] = {"rank_max": lora["rank_max"]}
        if grid["rank"]:
            config["grid"]["rank"] = grid["rank"]
    else:
        config["grid"]["rank"] = grid["rank"] or [lora["rank"]]
    calib = q["calib"]
    if calib is not None:
        config["calib"] = {"file": calib["file"], **{k: calib[k] for k in ("windows", "seed") if calib[k] is not None}}
    return config
