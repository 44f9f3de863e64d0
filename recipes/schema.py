"""The recipe schema: a YAML pipeline read, checked and completed before any stage runs.

A recipe names a model and the stages to put it through, in this order::

    quantize -> correct -> finetune (or a cluster sweep) -> evaluate -> export

plus where the weights live while training (``offload``), the machine it is
meant for (``hardware``, checked by the planner; its ``device`` is where every
stage computes, ``auto`` without the section) and the Ray cluster
(``cluster``).  Each section's keys, defaults and checks are the settings of
the use case's spec (``engine.pipelines``), so a recipe and the command line
take the same settings with the same defaults.  Every key is known: a typo is
refused with the closest valid key, a wrong type, range or combination with one
line naming the key path, so nothing runs on a recipe that would fail an hour
in.  Paths are relative to the recipe file; ``{shared}`` is the shared models
and data folder.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import EngineError
from engine.options import Option, default_of, option_of, spec_type
from engine.pipelines import (
    CorrectSpec, DataSpec, ExportSpec, FinetuneSpec, HardwareSpec, OffloadSpec, QuantizeSpec, TaskSpec,
)
from engine.quant import all_options

from cluster.sweep import GridSpec, SweepSpec
from recipes.validate import REQUIRED, Keys, choice, file, listof, load_yaml, mapping, model, section, string

STAGES = ("quantize", "correct", "finetune", "evaluate", "export")
# The model each stage leaves behind, by the name ``evaluate.models`` uses.
PRODUCTS = {"float": None, "quantized": "quantize", "corrected": "correct", "finetuned": "finetune"}


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
# Sections, from the specs' settings


def _converter(option: Option, base: Path) -> Any:
    if option.kind == "file":
        return file(base)
    if option.kind in ("model", "data"):  # a local path, else a hub id
        return model(base)
    return option.check


RUN_FLAGS = ("resume", "overwrite", "force")  # the runner decides resuming per stage; never recipe keys


def keys_of(cls: type, base: Path, skip: tuple[str, ...] = ()) -> Keys:
    """The recipe keys of a spec's settings (nested specs as sections), with the spec's defaults."""
    keys: Keys = {}
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        default = default_of(cls, field.name)
        default = REQUIRED if default is dataclasses.MISSING else default
        inner = spec_type(cls, field)
        if inner is not None:
            inner_keys = keys_of(inner, base)  # a section left out holds its spec's defaults, filled in as if given
            keys[field.name] = (mapping(inner_keys),
                                section({}, field.name, inner_keys) if dataclasses.is_dataclass(default) else default)
        elif (option := option_of(field)) is not None:
            keys[field.name] = (_converter(option, base), default)
    return keys


def _top_keys(base: Path) -> Keys:
    data = keys_of(DataSpec, base)
    return {
        "name": (string, None),
        "description": (string, None),
        "output": (string, None),
        "model": (mapping({"path": (model(base), REQUIRED), "shape": (string, None)}), REQUIRED),
        "quantize": (mapping({
            **keys_of(QuantizeSpec, base, skip=("model", "out", "overwrite", "options", "device")),
            **{name: (option.check, None) for name, option in all_options().items()},
        }), None),
        "correct": (mapping(keys_of(CorrectSpec, base, skip=("model", "out", "parallel", *RUN_FLAGS, "device"))),
                    None),
        "finetune": (mapping(keys_of(FinetuneSpec, base, skip=("model", "out", "offload", "parallel", *RUN_FLAGS,
                                                                "device"))), None),
        "evaluate": (mapping({
            "models": (listof(choice(tuple(PRODUCTS))), None),
            "tasks": (listof(mapping({**data, **keys_of(TaskSpec, base, skip=("data",))})), REQUIRED),
        }), None),
        "export": (mapping(keys_of(ExportSpec, base, skip=("run", "out", "overwrite", "device"))), None),
        "offload": (mapping(keys_of(OffloadSpec, base)), None),
        "hardware": (mapping(keys_of(HardwareSpec, base)), None),
        "cluster": (mapping({
            "address": (string, None),
            "calibrate_workers": (Option("int", minimum=1).check, None),
            "train_workers": (Option("int", minimum=1).check, None),
            "threads": (Option("int", minimum=1).check, 1),
            "sweep": (mapping({
                "grid": (mapping(keys_of(GridSpec, base)), {}),
                **keys_of(SweepSpec, base, skip=("out", "quantize", "finetune", "evaluation", "grid")),
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


def read_recipe(recipe_file: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read and override a recipe, every key checked on its own (``recipes.load`` then checks the whole);
    any problem is one EngineError line naming the key path."""
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
    return Recipe(recipe_file.resolve(), name, output, sections)
