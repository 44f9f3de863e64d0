"""One set of defaults: the same finetune built from the command line, a recipe and a sweep grid point is the same
spec and trains to the same loss; every recipe setting a sweep carries reaches its trials; settings are checked
where they enter, against their declarations."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from conftest import GGUF_MODEL, TRAIN_TXT, VALID_TXT, modulora
from engine.errors import EngineError
from engine.options import Option, as_plain, option_of
from engine.pipelines import CalibSpec, DataSpec, FinetuneSpec, LoraSpec, QuantizeSpec, TrainSpec
from engine.quant import quantizer_class

FINETUNE = {"data": {"file": str(TRAIN_TXT), "seq_len": 64, "limit": 32}, "train": {"steps": 5}}
PLACES = ("model", "out", "resume")  # where a run reads and writes, not what it does


def write(path: Path, recipe: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(recipe))
    return path


def finetune_report(run: Path) -> dict[str, Any]:
    report = json.loads((run / "report.json").read_text())
    return {"spec": {k: v for k, v in report["spec"].items() if k not in PLACES}, "loss": report["final"]["loss"]}


def test_cli_recipe_and_sweep_build_the_same_finetune(tmp_path):
    from cluster.sweep.trial import run_point
    from recipes.load import load_recipe
    from recipes.specs import sweep_spec

    quantized = tmp_path / "q3"
    assert modulora("quantize", GGUF_MODEL, "--bits", "3", "--out", quantized) == 0
    assert modulora("finetune", quantized, "--data", TRAIN_TXT, "--seq-len", "64", "--limit", "32", "--steps", "5",
                    "--out", tmp_path / "cli") == 0
    recipe = write(tmp_path / "recipe.yaml", {"model": {"path": str(quantized)}, "finetune": FINETUNE})
    assert modulora("run", recipe, f"output={tmp_path / 'recipe'}") == 0
    sweep = write(tmp_path / "sweep.yaml", {
        "model": {"path": str(GGUF_MODEL)}, "quantize": {"method": "rtn", "bits": 3}, "finetune": FINETUNE,
        "evaluate": {"tasks": [{"file": str(VALID_TXT), "limit": 2}]},
        "cluster": {"sweep": {"cpus_per_trial": torch.get_num_threads()}},  # the same threads: the same float sums
    })
    spec = sweep_spec(load_recipe(sweep), tmp_path / "sweep")
    (point,) = spec.points()
    run_point(spec, point)  # what a Ray Tune trial runs, in this process

    cli = finetune_report(tmp_path / "cli")
    assert finetune_report(tmp_path / "recipe" / "finetuned") == cli
    assert finetune_report(Path(spec.trial(point).finetune.out)) == cli
    assert cli["spec"]["train"] == as_plain(TrainSpec(steps=5)) and cli["spec"]["lora"] == as_plain(LoraSpec())


def _other(option: Option, value: Any) -> Any:
    """A valid value of ``option`` other than ``value``."""
    if option.choices is not None:
        return next(c for c in option.choices if c != value)
    if option.kind == "bool":
        return not value
    if option.kind == "int":
        return (value or 0) + 3
    if option.kind == "float":
        return 0.05 if value in (None, 0) or value > 0.1 else value / 2
    raise AssertionError(option.kind)


def _varied(spec_class: type, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """Every plain setting of ``spec_class`` (but ``skip``) at a value other than its default."""
    values = {}
    for field in dataclasses.fields(spec_class):
        option = option_of(field)
        if option is not None and field.name not in skip and option.kind in ("bool", "int", "float", "str"):
            default = field.default if field.default is not dataclasses.MISSING else None
            values[field.name] = _other(option, default)
    return values


def test_every_recipe_setting_reaches_the_sweep_trials(tmp_path):
    """Each setting of the quantize and finetune sections, changed from its default, is in every trial's specs;
    the grid's axes (method, bits, group size, rank, lr) are the only ones that vary."""
    from recipes.load import load_recipe
    from recipes.specs import sweep_spec

    optq = {name: _other(option, option.default) for name, option in quantizer_class("optq").options.items()}
    optq.update(bits=3, group_size=64)
    calib = {"file": str(TRAIN_TXT), **_varied(CalibSpec, skip=("asym_alpha",)), "mode": "sequential",
             "asym_alpha": 0.25}
    train = _varied(TrainSpec, skip=("optimizer",))  # cpu_adam compiles DeepSpeed; checked as a spec below
    lora = {"rank": 8, "alpha": 5.0}
    data = {"file": str(TRAIN_TXT), **_varied(DataSpec, skip=("format", "template", "split")), "template": "{text}",
            "columns": {"text": "text"}}
    finetune = {"data": data, "lora": lora, "train": train, "dtype": "bfloat16", "eval_data": str(VALID_TXT),
                "eval_limit": 7}
    recipe = write(tmp_path / "sweep.yaml", {
        "model": {"path": str(GGUF_MODEL)}, "quantize": {"method": "optq", **optq, "calib": calib},
        "finetune": finetune, "evaluate": {"tasks": [{"file": str(VALID_TXT), "limit": 2}]},
        "cluster": {"sweep": {"grid": {"method": ["optq", "rtn"], "bits": [2, 4], "rank": [2, 4], "lr": [1e-3]}}},
    })
    spec = sweep_spec(load_recipe(recipe), tmp_path / "out")
    trials = [spec.trial(point) for point in spec.points()]
    assert len(trials) == 2 * 2 * 2
    for trial in trials:
        point, q, f = trial.point, trial.quantize, trial.finetune
        taken = quantizer_class(point.method).options
        assert q.options == {**{k: v for k, v in optq.items() if k in taken}, "bits": point.bits,
                             "group_size": point.group_size}
        assert (q.calib is not None) == (point.method == "optq")
        if q.calib is not None:
            assert as_plain(q.calib) == calib
        assert as_plain(f.data) == {**as_plain(DataSpec(file=str(TRAIN_TXT))), **data}
        assert f.dtype == "bfloat16" and f.eval_limit == 7 and f.eval_data == str(VALID_TXT)
        assert as_plain(f.train) == {**as_plain(TrainSpec()), **train, "lr": 1e-3}
        assert f.lora == LoraSpec(rank=point.rank, alpha=5.0)
        assert trial.evaluate.tasks[0].data.limit == 2
    assert FinetuneSpec(model="m", data=DataSpec(file=str(TRAIN_TXT)), out="o",
                        train=TrainSpec(optimizer="cpu_adam")).train.optimizer == "cpu_adam"


@pytest.mark.parametrize(("make", "message"), [
    (lambda: TrainSpec(lr=float("nan")), "lr: expected a number > 0 and <= 10, got nan"),
    (lambda: TrainSpec(lr=float("inf")), "lr: expected a number > 0 and <= 10, got inf"),
    (lambda: TrainSpec(steps=0), "steps: expected an integer >= 1, got 0"),
    (lambda: TrainSpec(optimizer="sgd"), "optimizer: expected one of adamw, cpu_adam, got 'sgd'"),
    (lambda: LoraSpec(alpha=0.0), "alpha: expected a number > 0, got 0.0"),
    (lambda: LoraSpec(dynamic=True), "rank_max: required when dynamic is true"),
    (lambda: CalibSpec(file="x", mode="independent", asym_alpha=0.5), "asym_alpha: needs mode sequential"),
    (lambda: QuantizeSpec(model=str(GGUF_MODEL), out="o", method="rtn", options={"bits": 5}),
     "bits: expected one of 2, 3, 4, 8, got 5"),
    (lambda: QuantizeSpec(model=str(GGUF_MODEL), out="o", method="optq"), "calib: method 'optq' needs calibration"),
])
def test_specs_refuse_bad_settings_naming_them(make, message):
    with pytest.raises(EngineError) as info:
        make()
    assert str(info.value).startswith(message)


def test_defaults_are_declared_once():
    """The lower layers take no default of their own for a setting a spec declares: the spec's is the only one."""
    import inspect

    from engine.data import calibration_windows
    from engine.lora import ModuLoRALinear
    from engine.model import add_lora, quantize_calibrated
    from engine.train import distillation_loss, loftq_init

    required = {
        add_lora: ("alpha", "seed"), ModuLoRALinear.add_adapter: ("alpha",), calibration_windows: ("n_windows", "seq_len", "seed"),
        quantize_calibrated: ("mode", "asym_alpha"), distillation_loss: ("ce_weight",), loftq_init: ("iters",),
    }
    for function, names in required.items():
        parameters = inspect.signature(function).parameters
        for name in names:
            assert parameters[name].default is inspect.Parameter.empty, (function.__qualname__, name)
