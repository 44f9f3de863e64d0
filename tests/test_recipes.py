"""Recipes: strict validation (generated malformed recipes), the shipped recipes, the hardware plan, and a
pipeline killed mid-finetune that resumes without redoing finished stages."""

from __future__ import annotations

import copy
import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import GGUF_MODEL, SHARED, TRAIN_TXT, VALID_TXT, modulora

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
REAL_SCALE = ["llama-65b-optq3-alpaca-offload", "llama-2-70b-quip2-samsum", "falcon-40b-qdylora-sweep"]
SST2_DEV = SHARED / "data" / "sst2" / "dev.tsv"

# A small valid recipe every malformed one is made from: each stage once, a dynamic-rank finetune.
BASE: dict[str, Any] = {
    "model": {"path": str(GGUF_MODEL)},
    "quantize": {"method": "rtn", "bits": 3, "group_size": 32},
    "correct": {"calib": str(TRAIN_TXT), "rank": 4, "limit": 8, "seq_len": 64, "init": "zero",
                "train": {"steps": 4, "batch_size": 4, "save_every": 2, "warmup_steps": 1}},
    "finetune": {"data": {"file": str(TRAIN_TXT), "format": "text", "seq_len": 128, "limit": 96},
                 "lora": {"dynamic": True, "rank_max": 4},
                 "train": {"steps": 12, "batch_size": 8, "save_every": 2, "warmup_steps": 2}},
    "evaluate": {"models": ["quantized", "finetuned"],
                 "tasks": [{"file": str(VALID_TXT), "format": "text", "seq_len": 128, "limit": 8, "ranks": [1, 4]}]},
    "export": {"rank": 2},
}
DELETE = object()
OPTQ = {"method": "optq", "bits": 3, "calib": {"file": str(TRAIN_TXT), "windows": 4}}


def changed(**changes: Any) -> dict[str, Any]:
    """BASE with ``section__key__subkey=value`` changes (``DELETE`` removes the key)."""
    recipe = copy.deepcopy(BASE)
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        node = recipe
        for part in parents:
            node = node.setdefault(part, {})
        if value is DELETE:
            node.pop(last, None)
        else:
            node[last] = value
    return recipe


def truncations() -> list[tuple[str, str]]:
    """The quickstart recipe cut right after an opening quote, brace or bracket: never valid YAML."""
    text = (ROOT / "recipes" / "quickstart.yaml").read_text()
    body = text.index("model:")
    opening_quotes = [i for i, ch in enumerate(text) if ch == '"' and i > body][::2]
    cuts = [*opening_quotes[:: max(1, len(opening_quotes) // 3)], text.index("{", body), text.rindex("{"),
            text.index("[", body), text.rindex("[")]
    return [(f"truncated-{i}", text[: cut + 1]) for i, cut in enumerate(cuts)]


# (id, recipe: dict or YAML text, overrides, expected part of the one-line error)
MALFORMED: list[tuple[str, Any, list[str], str]] = [
    # unknown keys, with the closest valid key suggested
    ("top-typo", {**BASE, "modle": BASE["model"]}, [], "modle: unknown key; did you mean 'model'?"),
    ("top-unknown", {**BASE, "stages": ["quantize"]}, [], "stages: unknown key; allowed: name"),
    ("quantize-typo", changed(quantize__bitz=3), [], "quantize.bitz: unknown key; did you mean 'bits'?"),
    ("calib-typo", changed(quantize={**OPTQ, "calib": {"file": str(TRAIN_TXT), "windws": 4}}), [],
     "quantize.calib.windws: unknown key; did you mean 'windows'?"),
    ("correct-typo", changed(correct__rnak=4), [], "correct.rnak: unknown key; did you mean 'rank'?"),
    ("correct-train-typo", changed(correct__train__stpes=4), [], "correct.train.stpes: unknown key; did you mean 'steps'?"),
    ("lora-typo", changed(finetune__lora__rnak=4), [], "finetune.lora.rnak: unknown key; did you mean 'rank'?"),
    ("data-typo", changed(finetune__data__fromat="text"), [], "finetune.data.fromat: unknown key; did you mean 'format'?"),
    ("train-unknown", changed(finetune__train__learning_rate=0.1), [], "finetune.train.learning_rate: unknown key"),
    ("task-typo", changed(evaluate__tasks=[{**BASE["evaluate"]["tasks"][0], "rank": 1}]), [],
     "evaluate.tasks[0].rank: unknown key; did you mean 'ranks'?"),
    ("export-typo", changed(export__merge=True), [], "export.merge: unknown key; did you mean 'merged'?"),
    ("offload-typo", changed(offload={"teir": "host"}), [], "offload.teir: unknown key; did you mean 'tier'?"),
    ("hardware-unknown", changed(hardware={"gpu_mem": "24GiB", "host_mem": "64GiB"}), [], "hardware.gpu_mem: unknown key"),
    ("grid-typo", changed(cluster={"sweep": {"grid": {"bit": [2]}}}), [],
     "cluster.sweep.grid.bit: unknown key; did you mean 'bits'?"),
    # wrong types
    ("bits-word", changed(quantize__bits="three"), [], "quantize.bits: expected one of 2, 3, 4, 8, got 'three'"),
    ("group-string", changed(quantize__group_size="32"), [], "quantize.group_size: expected an integer"),
    ("rank-float", changed(correct__rank=2.5), [], "correct.rank: expected an integer >= 1, got 2.5"),
    ("lr-word", changed(finetune__train__lr="fast"), [], "finetune.train.lr: expected a number > 0 and <= 10, got 'fast'"),
    ("dynamic-string", changed(finetune__lora__dynamic="yes"), [], "finetune.lora.dynamic: expected true or false"),
    ("columns-list", changed(finetune__data__columns=["text"]), [], "finetune.data.columns: expected a mapping"),
    ("tasks-string", changed(evaluate__tasks="valid.txt"), [], "evaluate.tasks[0]: expected a mapping"),
    ("model-string", {**BASE, "model": str(GGUF_MODEL)}, [], "model: expected a mapping"),
    ("checkpointing-int", changed(finetune__train__grad_checkpointing=1), [],
     "finetune.train.grad_checkpointing: expected true or false"),
    ("merged-string", changed(export__merged="no"), [], "export.merged: expected true or false"),
    ("ranks-words", changed(evaluate__tasks=[{**BASE["evaluate"]["tasks"][0], "ranks": ["one"]}]), [],
     "evaluate.tasks[0].ranks[0]: expected an integer >= 1, got 'one'"),
    ("symmetric-string", changed(quantize__symmetric="true"), [], "quantize.symmetric: expected true or false"),
    ("method-unknown", changed(quantize__method="awq"), [], "quantize.method: unknown quantization method 'awq'; allowed: fp4, hqq, nf4, optq, qtip, quip, rtn"),
    ("format-unknown", changed(finetune__data__format="csv"), [], "finetune.data.format: expected one of"),
    # out of range
    ("bits-5", changed(quantize__bits=5), [], "quantize.bits: expected one of 2, 3, 4, 8, got 5"),
    ("lora-rank-0", changed(finetune__lora={"rank": 0}), [], "finetune.lora.rank: expected an integer >= 1, got 0"),
    ("correct-rank-0", changed(correct__rank=0), [], "correct.rank: expected an integer >= 1, got 0"),
    ("steps-0", changed(finetune__train__steps=0), [], "finetune.train.steps: expected an integer >= 1, got 0"),
    ("lr-negative", changed(finetune__train__lr=-1), [], "finetune.train.lr: expected a number > 0 and <= 10, got -1"),
    ("seq-len-1", changed(finetune__data__seq_len=1), [], "finetune.data.seq_len: expected an integer >= 2, got 1"),
    ("group-minus-2", changed(quantize__group_size=-2), [], "quantize.group_size: expected an integer >= -1, got -2"),
    ("group-0", changed(quantize__group_size=0), [], "quantize.group_size: expected a positive integer or -1"),
    ("warmup-negative", changed(correct__train__warmup_steps=-1), [], "correct.train.warmup_steps: expected an integer >= 0"),
    ("prefetch-negative", changed(offload={"prefetch": -1}), [], "offload.prefetch: expected an integer >= 0"),
    ("asym-alpha-1.5", changed(quantize={**OPTQ, "calib": {**OPTQ["calib"], "asym_alpha": 1.5}}), [],
     "quantize.calib.asym_alpha: expected a number >= 0 and <= 1, got 1.5"),
    ("min-lr-2", changed(finetune__train__min_lr_ratio=2), [], "finetune.train.min_lr_ratio: expected a number >= 0 and <= 1"),
    ("host-mem-word", changed(hardware={"device": "cpu", "host_mem": "lots"}), [], "hardware.host_mem: expected a size such as 24GiB"),
    ("quip-group", changed(quantize={"method": "quip", "group_size": 64, "calib": {"file": str(TRAIN_TXT)}}), [],
     "quantize.group_size: method 'quip' does not take it"),
    # impossible combinations
    ("dynamic-no-rank-max", changed(finetune__lora={"dynamic": True}), [], "finetune.lora.rank_max: required when"),
    ("rank-max-not-dynamic", changed(finetune__lora={"rank_max": 4}), [], "finetune.lora.rank_max: only for a dynamic"),
    ("frozen-not-dynamic", changed(finetune__lora={"rank": 4, "frozen": True}), [], "finetune.lora.frozen: a QDyLoRA variant"),
    ("gguf-on-float", changed(quantize={"method": "gguf"}), [], "quantize.method: 'gguf' needs model.path to be a GGUF file"
     " with quantized weights"),
    ("ranks-not-dynamic", changed(finetune__lora={"rank": 4}, export=DELETE), [],
     "evaluate.tasks[0].ranks: ranks need a dynamic-rank finetune"),
    ("ranks-above-max", changed(evaluate__tasks=[{**BASE["evaluate"]["tasks"][0], "ranks": [8]}]), [],
     "evaluate.tasks[0].ranks: 8 is above finetune.lora.rank_max 4"),
    ("export-rank-above", changed(export__rank=8), [], "export.rank: 8 is above finetune.lora.rank_max 4"),
    ("offload-no-finetune", changed(finetune=DELETE, evaluate=DELETE, export=DELETE, offload={"tier": "host"}), [],
     "offload: streams weights during a finetune"),
    ("offload-optimizer-adamw", changed(offload={"optimizer": True}), [], "offload.optimizer: keeping optimizer state"),
    ("offload-dir-not-disk", changed(offload={"tier": "host", "dir": "/tmp/blocks"}), [], "offload.dir: only the disk tier"),
    ("correct-unquantized", changed(quantize=DELETE, evaluate__models=["finetuned"]), [], "correct: needs a quantized model"),
    ("rtn-with-calib", changed(quantize__calib={"file": str(TRAIN_TXT)}), [], "quantize.calib: method 'rtn' does not use"),
    ("optq-without-calib", changed(quantize={"method": "optq", "bits": 3}), [], "quantize.calib: method 'optq' needs"),
    ("rank-differs-from-correct", changed(correct__rank=8), [], "finetune.lora.rank_max: 4 differs from correct.rank 8"),
    ("cuda-no-device-mem", changed(hardware={"host_mem": "64GiB"}), [], "hardware.device_mem: required for device cuda"),
    ("rtn-act-order", changed(quantize__act_order=True), [], "quantize.act_order: method 'rtn' does not take it"),
    ("workers-for-rtn", changed(cluster={"calibrate_workers": 2}), [], "cluster.calibrate_workers: calibration runs on Ray"),
    ("sweep-with-correct", changed(cluster={"sweep": {}}), [], "correct: a cluster sweep runs"),
    ("evaluate-corrected-missing", changed(correct=DELETE, evaluate__models=["corrected"]), [],
     "evaluate.models[0]: 'corrected' needs a correct section"),
    ("classification-no-labels", changed(finetune__data__format="classification"), [], "finetune.data.label_words:"),
    ("no-stage", {"model": BASE["model"]}, [], "recipe: no stage to run"),
    ("eval-every-no-data", changed(finetune__train__eval_every=5), [], "finetune.train.eval_every: needs finetune.eval_data"),
    ("hardware-unknown-shape", changed(hardware={"device": "cpu", "host_mem": "64GiB"}, model__shape="llama-99b"), [],
     "model.shape: 'llama-99b' is neither a built-in shape"),
    # missing files
    ("model-missing", changed(model__path="/nonexistent/model.gguf"), [], "model.path: /nonexistent/model.gguf: no such file"),
    ("model-relative-missing", changed(model__path="models/none.gguf"), [], "none.gguf: no such file or directory"),
    ("data-missing", changed(finetune__data__file="/nonexistent/train.txt"), [], "finetune.data.file: /nonexistent/train.txt: no such file"),
    ("correct-calib-missing", changed(correct__calib="missing.txt"), [], "correct.calib: "),
    ("task-file-missing", changed(evaluate__tasks=[{**BASE["evaluate"]["tasks"][0], "file": "/none/valid.txt"}]), [],
     "evaluate.tasks[0].file: /none/valid.txt: no such file"),
    ("calib-file-missing", changed(quantize={**OPTQ, "calib": {"file": "{shared}/data/none.txt"}}), [],
     "quantize.calib.file: "),
    # files that are not a recipe
    ("empty-file", "", [], "a recipe is a mapping of sections"),
    ("a-list", "- model\n- quantize\n", [], "a recipe is a mapping of sections (model, quantize, ...), got list"),
    ("bad-indent", "model:\n  path: x\n    quantize: 3\n", [], "not valid YAML"),
    ("tab-indent", "model:\n\tpath: x\n", [], "not valid YAML"),
    *[(name, text, [], "not valid YAML") for name, text in truncations()],
    # bad overrides
    ("override-no-value", BASE, ["finetune.lora.rank"], "override 'finetune.lora.rank': expected KEY.PATH=VALUE"),
    ("override-no-key", BASE, ["=3"], "override '=3': expected KEY.PATH=VALUE"),
    ("override-into-value", BASE, ["finetune.lora.rank_max.x=1"], "finetune.lora.rank_max is not a section"),
    ("override-typo", BASE, ["finetune.lora.rnak=4"], "finetune.lora.rnak: unknown key; did you mean 'rank'?"),
    ("override-range", BASE, ["quantize.bits=5"], "quantize.bits: expected one of 2, 3, 4, 8, got 5"),
    ("override-bad-yaml", BASE, ["finetune.train.lr=[1"], "the value is not valid YAML"),
]


@pytest.fixture(scope="module", autouse=True)
def _imported():
    """Import the CLI's plugins once, so no import-time log line lands in a captured error."""
    for module in ("cluster.sweep", "recipes.cli"):
        importlib.import_module(module)


def write_recipe(path: Path, recipe: Any) -> Path:
    path.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe, sort_keys=False))
    return path


def test_enough_malformed_recipes():
    assert len(MALFORMED) >= 50
    assert len({case[0] for case in MALFORMED}) == len(MALFORMED)


@pytest.mark.parametrize(("recipe", "overrides", "message"), [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed_recipe_is_one_line_and_exit_code_2(tmp_path, capsys, recipe, overrides, message):
    path = write_recipe(tmp_path / "bad.yaml", recipe)
    code = modulora("run", path, *overrides, f"output={tmp_path / 'out'}")
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2, captured
    assert len(lines) == 1 and lines[0].startswith("modulora: error: "), lines
    assert message in lines[0]
    assert "Traceback" not in captured.err + captured.out
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_not_utf8_and_missing_recipe_files(tmp_path, capsys):
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"model:\n  path: \xff\xfe\n")
    assert modulora("run", binary) == 2
    assert "not UTF-8 text" in capsys.readouterr().err
    assert modulora("run", tmp_path / "absent.yaml") == 2
    assert "absent.yaml: no such file" in capsys.readouterr().err


@pytest.mark.slow
def test_console_script_error_is_one_line(tmp_path):
    """The installed ``modulora`` command itself: exit code 2, one line, no traceback."""
    path = write_recipe(tmp_path / "bad.yaml", changed(finetune__lora={"dynamic": True}))
    done = subprocess.run([str(Path(sys.executable).parent / "modulora"), "run", str(path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "modulora: error: finetune.lora.rank_max: required when finetune.lora.dynamic is true (ranks 1..rank_max)"]


def test_overrides_set_values_and_list_items():
    from recipes.load import load_recipe

    recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml",
                         ["finetune.train.steps=7", "evaluate.tasks.0.limit=3", "export.merged=false", "output=/tmp/x"])
    assert recipe.get("finetune")["train"]["steps"] == 7
    assert recipe.get("evaluate")["tasks"][0]["limit"] == 3
    assert recipe.get("export")["merged"] is False and recipe.output == Path("/tmp/x")
    assert recipe.stages == ["quantize", "correct", "finetune", "evaluate", "export"]


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_shipped_recipes_validate(path, capsys):
    assert modulora("run", path, "--dry-run") == 0
    assert capsys.readouterr().out.startswith(f"{path.stem}: ")


@pytest.mark.parametrize("section", ["finetune.lora", "finetune.train", "correct.train"])
def test_a_section_left_out_holds_its_defaults(section, tmp_path, capsys):
    """quickstart.yaml without one nested section: it validates (no KeyError), and the built spec carries the
    spec's own defaults for it (one set of defaults)."""
    from engine.pipelines import LoraSpec
    from engine.train import TrainSpec
    from recipes.load import load_recipe

    recipe = yaml.safe_load((ROOT / "recipes" / "quickstart.yaml").read_text().replace("{shared}", str(SHARED)))
    parent, child = section.split(".")
    del recipe[parent][child]
    if child == "lora":  # a fixed-rank adapter now: evaluation at several ranks does not apply
        for task in recipe["evaluate"]["tasks"]:
            task.pop("ranks", None)
        recipe["export"].pop("rank", None)
    path = tmp_path / "cut.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert modulora("run", path, "--dry-run", f"output={tmp_path / 'out'}") == 0, capsys.readouterr().err
    loaded = load_recipe(path).get(parent)[child]
    default = LoraSpec() if child == "lora" else TrainSpec()
    assert all(loaded[key] == getattr(default, key) for key in ("rank", "dynamic") if child == "lora")
    assert all(loaded[key] == getattr(default, key) for key in ("lr", "save_every", "steps") if child == "train")


@pytest.mark.parametrize("name", REAL_SCALE)
def test_real_scale_recipes_fit_their_hardware(name, capsys):
    """`modulora plan`, with the recipe's model shape, bits, rank, batch and placement, says it fits the
    hardware the recipe declares."""
    from engine.pipelines.commandline import command_line
    from recipes.checks import plan_shape
    from recipes.load import load_recipe
    from recipes.specs import plan_spec

    recipe = load_recipe(ROOT / "recipes" / f"{name}.yaml")
    assert recipe.get("hardware")["device"] == "cuda"
    args = command_line(plan_spec(recipe, plan_shape(recipe)))
    assert modulora("plan", *args, "--json") == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["fits"] and plan["device_peak_bytes"] <= recipe.get("hardware")["device_mem"]
    assert plan["inputs"]["rank"] == 16 and plan["model"] == recipe.get("model")["shape"]


def test_recipe_that_does_not_fit_is_refused(capsys):
    code = modulora("run", ROOT / "recipes" / "llama-65b-optq3-alpaca-offload.yaml", "hardware.host_mem=16GiB",
                    "hardware.device_mem=4GiB", "--dry-run")
    assert code == 2
    assert "hardware: the recipe does not fit its declared hardware" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# Running


def run_in_child(recipe: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "recipes" / "run.py"), str(recipe), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def report_metrics(out: Path) -> dict[str, Any]:
    """Each stage's metrics in ``report.json``, without wall times and the output folder's own path."""

    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if "second" not in k and k != "base"}
        return value

    stages = json.loads((out / "report.json").read_text())["stages"]
    return {name: strip(record["metrics"]) for name, record in stages.items()}


@pytest.mark.slow
def test_killed_run_resumes_without_redoing_finished_stages(tmp_path):
    recipe = write_recipe(tmp_path / "tiny.yaml", BASE)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert modulora("run", recipe, f"output={whole}") == 0

    child = run_in_child(recipe, f"output={killed}")
    deadline = time.monotonic() + 600
    while not list((killed / "finetuned").glob("**/step-*")) and child.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)  # mid-finetune: it has checkpoints but has not finished
    child.communicate()
    assert (killed / "stages" / "correct.json").is_file() and not (killed / "stages" / "finetune.json").exists()

    resumed = run_in_child(recipe, f"output={killed}")
    output, _ = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, output[-3000:]
    assert "quantize: finished earlier with the same inputs, skipped" in output
    assert "correct: finished earlier with the same inputs, skipped" in output
    assert "finetune: continuing from its last checkpoint" in output
    assert report_metrics(killed) == report_metrics(whole)
    report = json.loads((killed / "report.json").read_text())
    assert report["finished"] and report["stages"]["finetune"]["resumed"]
    assert (killed / "export" / "adapter" / "adapter_model.safetensors").is_file()
    assert "| finetuned | valid | 4 |" in (killed / "report.md").read_text()

    # A changed evaluation redoes the evaluation alone; an unchanged recipe redoes nothing.
    again = run_in_child(recipe, f"output={killed}", "evaluate.tasks.0.limit=4")
    output, _ = again.communicate(timeout=900)
    assert again.returncode == 0, output[-3000:]
    skipped = [line.split("]")[1].split(":")[0].strip() for line in output.splitlines() if "skipped" in line]
    assert skipped == ["quantize", "correct", "finetune", "export"]
    assert report_metrics(killed)["evaluate"] != report_metrics(whole)["evaluate"]


def _count_correct(model_dir: Path, rows: int, max_len: int) -> int:
    """How many of the first ``rows`` SST-2 dev sentences the model gets right, counted here without the engine's
    metric: each label word scored on its own (BOS, the template's prompt, " word"), float64 log-probabilities."""
    import csv

    import torch

    from engine.pipelines import load_with_adapter

    model, tokenizer, _ = load_with_adapter(model_dir)
    model.eval()
    with open(SST2_DEV, newline="") as handle:
        records = list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    words = {"0": " negative", "1": " positive"}
    correct = 0
    for row in records[:rows]:
        scores = {}
        for label, word in words.items():
            word_ids = tokenizer(word, add_special_tokens=False).input_ids
            prompt = tokenizer(row["sentence"] + "\nAnswer:", add_special_tokens=False).input_ids
            prompt = [tokenizer.bos_token_id, *prompt[-(max_len - 2 - 1):]]  # room for the longer word (2 tokens)
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([prompt + word_ids])).logits[0].double()
            log_probs = torch.log_softmax(logits, dim=-1)
            scores[label] = sum(log_probs[len(prompt) - 1 + j, t].item() for j, t in enumerate(word_ids))
        correct += max(scores, key=scores.get) == row["label"]
    return correct


@pytest.mark.slow
def test_classification_recipe_runs(tmp_path):
    """A shipped recipe at tiny settings: SST-2 at 3 bits; each model's accuracy is the share of sentences an
    independent scoring loop gets right."""
    overrides = ["quantize.calib.windows=4", "finetune.data.limit=64", "finetune.train.steps=4",
                 "finetune.train.batch_size=4", "evaluate.tasks.0.limit=40", f"output={tmp_path}"]
    assert modulora("run", ROOT / "recipes" / "sst2-3bit.yaml", *overrides) == 0
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    for model, folder in (("quantized", "quantized"), ("finetuned", "finetuned")):
        assert results[model]["sst2-dev"]["rows"] == 40
        assert results[model]["sst2-dev"]["accuracy"] == _count_correct(tmp_path / folder, 40, 128) / 40
    assert results["finetuned"]["bits_per_weight_with_adapter"] > results["quantized"]["bits_per_weight"]
    assert (tmp_path / "export" / "adapter" / "adapter_config.json").is_file()
