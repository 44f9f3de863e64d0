"""The ``modulora`` command line: each command builds its use case's spec from its flags and calls the use case
(``engine.pipelines``); the flags, their defaults and help come from the specs' declared settings.

Every user error (bad option, missing file, corrupt model directory) ends as one
line on stderr and exit code 2; tracebacks are for bugs only.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

import click

from engine.errors import EngineError
from engine.pipelines import (
    CorrectSpec, EvalSpec, ExportSpec, FinetuneSpec, PlanSpec, TaskSpec, options, quantize_options, quantize_spec,
    spec_from,
)
from engine.procstat import keep_heap_bounded

EXIT_USAGE = 2
PLUGIN_GROUP = "modulora.commands"


def _fail(message: str) -> None:
    click.echo(f"modulora: error: {message}", err=True)
    sys.exit(EXIT_USAGE)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
def cli(verbose: bool) -> None:
    """ModuLoRA Engine: quantize, finetune and evaluate large language models at 2-8 bits."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not verbose:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


@cli.command()
@click.argument("model")
@quantize_options
def quantize(model: str, **given: Any) -> None:
    """Quantize MODEL's decoder linear layers and save a quantized directory.

    Methods that need calibration (optq, quip) take --calib FILE: statistics of
    each layer's inputs over random windows of that text.  Every method setting
    defaults to the best measured for the method (docs/quality.md).
    """
    from engine.pipelines import quantize as run_quantize

    spec = quantize_spec(model, given)
    manifest = run_quantize(spec)
    size = manifest["size"]
    click.echo(f"{spec.out}: {len(manifest['layers'])} layers, {size['bits_per_weight']:.3f} bits/weight, "
               f"{size['model_bytes'] / 1e6:.2f} MB, {manifest.get('quantize_seconds', 0.0):.1f} s")


@cli.command(name="eval")
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@options(TaskSpec, skip=("name",))
@options(EvalSpec, skip=("model", "tasks", "offload.optimizer"))
def evaluate(model: str, as_json: bool, **given: Any) -> None:
    """Evaluate MODEL (float, quantized, corrected or finetuned) on a data file.

    --format text reports perplexity (the whole file, BOS first, non-overlapping
    windows of --seq-len, float64 NLL); classification reports accuracy of the
    most likely label word; summarization reports ROUGE-1/2/L of greedy summaries;
    alpaca and chat report the perplexity of the responses (assistant turns).
    """
    from engine.pipelines import evaluate as run_evaluate

    placement = {key: given.pop(key) for key in list(given) if key.startswith("offload__") or key == "device"}
    task = spec_from(TaskSpec, given)
    report = run_evaluate(spec_from(EvalSpec, placement, model=model, tasks=(task,)), progress=not as_json)
    results = report.pop("tasks")[task.label]
    d = task.data
    report.update({"data": d.file, "format": d.format, "seq_len": d.seq_len})
    report.update({"ranks": results["ranks"]} if task.ranks else results)
    if as_json:
        click.echo(json.dumps(report))
        return
    for rank, values in (results["ranks"] if task.ranks else {None: results}).items():
        prefix = f"rank {rank}: " if rank is not None else ""
        click.echo(prefix + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items()))
    click.echo(f"{report['bits_per_weight']:.3f} bits/weight ({report['bits_per_weight_with_adapter']:.3f} with adapter), "
               f"{report['model_bytes'] / 1e6:.2f} MB")


@cli.command()
@click.argument("directory")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def info(directory: str, as_json: bool) -> None:
    """What a quantized directory holds."""
    from engine.model import read_manifest

    manifest = read_manifest(directory)
    if as_json:
        click.echo(json.dumps(manifest, indent=2))
        return
    quantizer = manifest.get("quantizer", {})
    size = manifest["size"]
    formats = sorted({layer["format"] for layer in manifest["layers"].values()})
    click.echo(f"directory      {directory}")
    click.echo(f"source model   {manifest.get('source_model', '?')}")
    click.echo(f"quantizer      {', '.join(f'{k}={v}' for k, v in quantizer.items())}")
    click.echo(f"layers         {len(manifest['layers'])} ({', '.join(formats)})")
    click.echo(f"bits/weight    {size['bits_per_weight']:.3f} (scales and zeros included)")
    click.echo(f"packed layers  {size['quantized_bytes'] / 1e6:.3f} MB")
    click.echo(f"model total    {size['model_bytes'] / 1e6:.3f} MB")


@cli.command()
@click.argument("model")
@options(FinetuneSpec, skip=("model",))
def finetune(model: str, **given: Any) -> None:
    """Train LoRA on MODEL: a float model, a quantized directory, or a corrected one."""
    from engine.pipelines import finetune as run_finetune

    spec = spec_from(FinetuneSpec, given, model=model)
    report = run_finetune(spec)
    click.echo(f"{spec.out}: {report['examples']} examples, final loss {report['final'].get('loss', float('nan')):.4f}, "
               f"{report['train_seconds']:.1f} s")


@cli.command()
@click.argument("quantized_dir")
@options(CorrectSpec, skip=("model",))
def correct(quantized_dir: str, **given: Any) -> None:
    """LREC: train LoRA so the quantized model matches its float teacher (KL + cross-entropy)."""
    from engine.pipelines import correct as run_correct

    spec = spec_from(CorrectSpec, given, model=quantized_dir)
    report = run_correct(spec)
    size = report["size"]
    click.echo(f"{spec.out}: corrected, {size['bits_per_weight']:.3f} bits/weight "
               f"({size['bits_per_weight_with_adapter']:.3f} with the adapter), {report['train_seconds']:.1f} s")


@cli.command()
@click.argument("run_dir")
@options(ExportSpec, skip=("run",))
def export(run_dir: str, **given: Any) -> None:
    """Export the adapter of a finetune or correct run as PEFT (and optionally a merged float model, the GPTQ-layout
    base, or GGUF files for llama.cpp)."""
    from engine.pipelines import export as run_export

    spec = spec_from(ExportSpec, given, run=run_dir)
    result = run_export(spec)
    click.echo(f"{spec.out}: adapter rank {result['rank']}" + (", merged model" if spec.merged else "")
               + (", GPTQ base" if spec.gptq else "") + (f", GGUF {spec.gguf} model and LoRA" if spec.gguf else ""))


@cli.command(name="plan")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@options(PlanSpec)
def plan_command(as_json: bool, **given: Any) -> None:
    """Predict the peak memory of a stage (finetune by default; --stage quantize, calibrate, correct, eval or
    export) and a finetune's step time, from the model's shapes alone.

    Unset settings take the stage's and the quantizer's defaults.  Exit code 0
    whether it fits or not; the verdict says which memory is short and what would fit.
    """
    from engine.pipelines import plan

    spec = spec_from(PlanSpec, given)
    result = plan(spec)
    if as_json:
        click.echo(json.dumps({"model": spec.model, **result.to_json()}, indent=2))
    else:
        click.echo(result.render(spec.model))


def add_plugin_commands() -> None:
    """Commands other packages register under the ``modulora.commands`` entry-point group (``cluster`` and
    ``recipes`` add theirs this way, so the engine never imports them)."""
    from importlib.metadata import entry_points

    for entry in entry_points(group=PLUGIN_GROUP):
        if entry.name in cli.commands:
            continue
        try:
            cli.add_command(entry.load(), entry.name)
        except Exception as exc:  # a broken plugin must not take the engine's own commands down
            logging.getLogger(__name__).warning("plugin command %r unavailable: %s", entry.name, exc)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: click's own errors and EngineError both become one line and exit code 2."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    keep_heap_bounded()
    add_plugin_commands()
    try:
        cli.main(args=argv, prog_name="modulora", standalone_mode=False)
    except click.exceptions.Abort:
        _fail("aborted")
    except click.exceptions.ClickException as exc:
        _fail(exc.format_message().replace("\n", " "))
    except EngineError as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": "))  # ConnectionError: no strerror


if __name__ == "__main__":
    main()
