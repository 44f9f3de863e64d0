"""The ``modulora`` command line.

Every user error (bad option, missing file, corrupt model directory) ends as one
line on stderr and exit code 2; tracebacks are for bugs only.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import click

from engine.errors import EngineError

EXIT_USAGE = 2


def _fail(message: str) -> None:
    click.echo(f"modulora: error: {message}", err=True)
    sys.exit(EXIT_USAGE)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
def cli(verbose: bool) -> None:
    """ModuLoRA Engine: quantize, finetune and evaluate large language models at 2-8 bits."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not verbose:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


def _quantizer_options(method: str, given: dict[str, Any], seed: int | None) -> dict[str, Any]:
    """Constructor options for ``method``: every option the user gave must be one it takes; the
    calibration seed is passed on too where the quantizer takes one (e.g. for random rotations)."""
    from engine.quant import QUANTIZERS, make_quantizer

    if method not in QUANTIZERS:
        make_quantizer(method)  # raises the one-line "unknown method" error
    accepted = inspect.signature(QUANTIZERS[method]).parameters
    options = {name: value for name, value in given.items() if value is not None}
    rejected = [f"--{name.replace('_', '-')}" for name in options if name not in accepted]
    if rejected:
        raise EngineError(f"method {method!r} does not take {', '.join(rejected)}")
    if seed is not None and "seed" in accepted:
        options["seed"] = seed
    return options


def _key_values(pairs: tuple[str, ...], option: str) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise EngineError(f"{option} takes KEY=VALUE, got {pair!r}")
        out[key] = value
    return out


def data_options(command: Any) -> Any:
    """Options shared by commands that read a data set: its format, columns, label words, template."""
    from engine.data import FORMATS

    options = [
        click.option("--format", "data_format", type=click.Choice(FORMATS), default="text", show_default=True),
        click.option("--column", "columns", multiple=True, metavar="ROLE=NAME",
                      help="Column for a role, e.g. text=sentence, label=label, document=dialogue."),
        click.option("--label-word", "label_words", multiple=True, metavar="LABEL=WORD",
                      help="Word a class label is spoken as, e.g. 0=negative."),
        click.option("--template", default=None, help="Prompt template, e.g. '{text}\nAnswer:'."),
        click.option("--limit", type=click.IntRange(min=1), default=None, help="Use at most this many rows."),
        click.option("--seq-len", type=click.IntRange(min=2), default=256, show_default=True),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _spec(data_format: str, columns: tuple[str, ...], label_words: tuple[str, ...], template: str | None) -> Any:
    from engine.data import FormatSpec

    return FormatSpec(data_format, _key_values(columns, "--column"), template, _key_values(label_words, "--label-word"))


def train_options(command: Any) -> Any:
    """Options of the training loop (TrainConfig) and of the adapter."""
    from engine.train.trainer import OPTIMIZERS

    options = [
        click.option("--rank", type=click.IntRange(min=1), default=8, show_default=True, help="LoRA rank."),
        click.option("--alpha", type=float, default=None, help="LoRA alpha [2 x rank]."),
        click.option("--steps", type=click.IntRange(min=1), default=100, show_default=True),
        click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True),
        click.option("--grad-accum", type=click.IntRange(min=1), default=1, show_default=True),
        click.option("--lr", type=float, default=3e-3, show_default=True),
        click.option("--warmup", "warmup_steps", type=click.IntRange(min=0), default=10, show_default=True),
        click.option("--weight-decay", type=float, default=0.0, show_default=True),
        click.option("--optimizer", type=click.Choice(OPTIMIZERS), default="adamw", show_default=True),
        click.option("--offload-optimizer", is_flag=True,
                     help="Keep float32 master weights and Adam moments in host memory (needs --optimizer cpu_adam)."),
        click.option("--grad-checkpointing", is_flag=True, help="Recompute each decoder block in backward."),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--save-every", type=click.IntRange(min=0), default=50, show_default=True),
        click.option("--keep-last", type=click.IntRange(min=1), default=2, show_default=True),
        click.option("--resume", is_flag=True, help="Continue from the newest good checkpoint in --out."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _train_config(given: dict[str, Any], **extra: Any) -> Any:
    from dataclasses import fields

    from engine.train import TrainConfig

    names = {f.name for f in fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in given.items() if k in names}, **extra)
    config.validate()  # before any model is loaded
    return config


def _alpha(rank: int, alpha: float | None) -> float:
    return alpha if alpha is not None else 2.0 * rank


@cli.command()
@click.argument("model")
@click.option("--method", default="rtn", show_default=True, help="Quantizer name: rtn, optq, quip, ...")
@click.option("--bits", type=click.Choice(["2", "3", "4", "8"]), help="Bits per weight [method's default].")
@click.option("--group-size", type=int, help="Columns per scale; -1 for one per row [method's default].")
@click.option("--symmetric", is_flag=True, default=None, help="Symmetric grid (no zero points).")
@click.option("--act-order", is_flag=True, default=None, help="OPTQ: quantize columns by decreasing Hessian diagonal.")
@click.option("--static-groups", is_flag=True, default=None, help="OPTQ: fix group ranges before any update.")
@click.option(
    "--clip-search", is_flag=True, default=None, help="OPTQ: clip group ranges where it lowers the weighted error."
)
@click.option("--damp", type=float, help="Hessian dampening, a fraction of its mean diagonal [method's default].")
@click.option(
    "--calib", "calib_file", type=click.Path(exists=True, dir_okay=False), help="Calibration text (UTF-8 file)."
)
@click.option(
    "--calib-mode",
    type=click.Choice(["sequential", "independent"]),
    help="sequential: each block calibrated on the quantized blocks before it; independent: all on the float model"
    " [sequential].",
)
@click.option("--calib-windows", type=click.IntRange(min=1), help="Calibration windows of 256 tokens [128].")
@click.option(
    "--asym-alpha",
    type=click.FloatRange(0.0, 1.0),
    help="Sequential calibration: pull each layer towards the float model's output (GPTAQ), 0 to 1 [0].",
)
@click.option("--seed", type=int, help="Seed of the calibration windows (and of the method, if random) [0].")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output directory.")
def quantize(**options: Any) -> None:
    """Quantize MODEL's decoder linear layers and save a quantized directory.

    Methods that need calibration (optq, quip) take --calib FILE: statistics of
    each layer's inputs over random windows of that text.
    """
    quantize_to_dir(**options)


def quantize_to_dir(
    model: str,
    method: str,
    calib_file: str | None,
    calib_mode: str | None,
    calib_windows: int | None,
    asym_alpha: float | None,
    seed: int | None,
    out_dir: str,
    runner_factory: Any = None,
    **given: Any,
) -> None:
    """The ``quantize`` command's work; ``runner_factory`` runs the calibration shards elsewhere
    (``modulora calibrate`` passes Ray's)."""
    from engine.model import load_float_model, quantize_model, save_quantized
    from engine.model.calibrate import quantize_with_calibration
    from engine.quant import make_quantizer

    if given["bits"] is not None:
        given["bits"] = int(given["bits"])
    quantizer = make_quantizer(method, **_quantizer_options(method, given, seed))
    calib_options = {
        "--calib": calib_file,
        "--calib-mode": calib_mode,
        "--calib-windows": calib_windows,
        "--asym-alpha": asym_alpha,
    }
    used = [flag for flag, value in calib_options.items() if value is not None]
    if not quantizer.needs_calibration and used:
        raise EngineError(f"method {method!r} does not use calibration data ({', '.join(used)})")
    if quantizer.needs_calibration and calib_file is None:
        raise EngineError(f"method {method!r} needs calibration data: pass --calib FILE")
    float_model, tokenizer = load_float_model(model)
    start = time.perf_counter()
    calibration = None
    if calib_file is not None:
        settings = {"n_windows": calib_windows, "seed": seed, "mode": calib_mode, "asym_alpha": asym_alpha,
                    "runner_factory": runner_factory}
        calibration = quantize_with_calibration(
            float_model, tokenizer, quantizer, calib_file, **{k: v for k, v in settings.items() if v is not None}
        )
    else:
        quantize_model(float_model, quantizer)
    seconds = time.perf_counter() - start
    source = str(Path(model).resolve()) if Path(model).exists() else model
    info = {"source_model": source, "quantizer": quantizer.describe(), "quantize_seconds": seconds}
    if calibration is not None:
        info["calibration"] = calibration
    manifest = save_quantized(float_model, tokenizer, out_dir, info)
    size = manifest["size"]
    click.echo(
        f"{out_dir}: {len(manifest['layers'])} layers, {size['bits_per_weight']:.3f} bits/weight, "
        f"{size['model_bytes'] / 1e6:.2f} MB, {seconds:.1f} s"
    )


@cli.command(name="eval")
@click.argument("model")
@click.option("--data", required=True, help="Text file (perplexity) or a classification / summarization data file.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--ranks", default=None, help="Comma-separated adapter ranks to evaluate a dynamic-rank run at, e.g. 1,2,4,8.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@data_options
def evaluate(model: str, data: str, batch_size: int, ranks: str | None, as_json: bool, data_format: str,
             columns: tuple[str, ...], label_words: tuple[str, ...], template: str | None, limit: int | None,
             seq_len: int) -> None:
    """Evaluate MODEL (float, quantized, corrected or finetuned) on a data file.

    --format text reports perplexity (the whole file, BOS first, non-overlapping
    windows of --seq-len, float64 NLL); classification reports accuracy of the
    most likely label word; summarization reports ROUGE-1/2/L of greedy summaries.
    """
    from engine.data import check_data
    from engine.eval.tasks import task_metric
    from engine.model import model_size
    from engine.train import set_active_rank
    from engine.train.runs import load_with_adapter

    rank_list = _rank_list(ranks)
    spec = _spec(data_format, columns, label_words, template)
    check_data(data, spec)  # before the (possibly long) model load
    loaded, tokenizer, _ = load_with_adapter(model)
    metric = task_metric(data_format, data, tokenizer, spec, limit, seq_len, batch_size, progress=not as_json)
    results = {}
    for rank in rank_list or [None]:
        set_active_rank(loaded, rank)
        results[rank] = metric(loaded)
    report = {"model": model, "data": data, "format": data_format, "seq_len": seq_len, **model_size(loaded)}
    if rank_list:
        report["ranks"] = {str(rank): values for rank, values in results.items()}
    else:
        report.update(results[None])
    if as_json:
        click.echo(json.dumps(report))
        return
    for rank, values in results.items():
        prefix = f"rank {rank}: " if rank is not None else ""
        click.echo(prefix + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items()))
    click.echo(f"{report['bits_per_weight']:.3f} bits/weight ({report['bits_per_weight_with_adapter']:.3f} with adapter), "
               f"{report['model_bytes'] / 1e6:.2f} MB")


def _rank_list(ranks: str | None) -> list[int]:
    if ranks is None:
        return []
    try:
        values = [int(r) for r in ranks.split(",") if r.strip()]
    except ValueError:
        raise EngineError(f"--ranks takes comma-separated integers, got {ranks!r}") from None
    if not values or min(values) < 1:
        raise EngineError(f"--ranks must list ranks >= 1, got {ranks!r}")
    return values


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
@click.option("--data", required=True, help="Training data file (json, jsonl, csv, tsv, parquet, txt).")
@click.option("--eval-data", default=None, help="Text file for perplexity during training.")
@click.option("--eval-every", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True,
              help="Compute dtype of the base matmuls.")
@click.option("--rank-max", type=click.IntRange(min=1), default=None, help="QDyLoRA: train every rank 1..R at once.")
@click.option("--dynamic", is_flag=True, help="QDyLoRA: sample the rank each step (needs --rank-max).")
@click.option("--frozen", is_flag=True, help="QDyLoRA: update only the sampled rank's row/column.")
@click.option("--offload", type=click.Choice(["device", "host", "disk"]), default=None,
              help="Stream the decoder blocks' packed weights from this tier [resident, no streaming].")
@click.option("--offload-dir", default=None, type=click.Path(file_okay=False),
              help="Block files of the disk tier [OUT/blocks].")
@click.option("--prefetch", type=click.IntRange(min=0), default=1, show_default=True,
              help="Blocks fetched ahead of the one computing.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False))
@data_options
@train_options
def finetune(model: str, data: str, eval_data: str | None, dtype: str, rank_max: int | None, dynamic: bool,
             frozen: bool, offload: str | None, offload_dir: str | None, prefetch: int, out_dir: str,
             data_format: str, columns: tuple[str, ...], label_words: tuple[str, ...], template: str | None,
             limit: int | None, seq_len: int, rank: int, alpha: float | None, resume: bool, **given: Any) -> None:
    """Train LoRA on MODEL: a float model, a quantized directory, or a corrected one."""
    from engine.train.runs import finetune as run_finetune

    if dynamic != (rank_max is not None):
        raise EngineError("--dynamic and --rank-max go together (QDyLoRA samples ranks 1..rank-max)")
    if frozen and not dynamic:
        raise EngineError("--frozen is a QDyLoRA variant: it needs --dynamic --rank-max R")
    config = _train_config(given, rank_max=rank_max, dynamic_frozen=frozen)
    adapter_rank = rank_max or rank
    report = run_finetune(
        model, data, _spec(data_format, columns, label_words, template), out_dir, config,
        rank=adapter_rank, alpha=_alpha(adapter_rank, alpha), seq_len=seq_len, limit=limit, dtype=dtype,
        eval_data=eval_data, resume=resume, offload=offload, offload_dir=offload_dir, prefetch=prefetch,
    )
    click.echo(f"{out_dir}: {report['examples']} examples, final loss {report['final'].get('loss', float('nan')):.4f}, "
               f"{report['train_seconds']:.1f} s")


@cli.command()
@click.argument("quantized_dir")
@click.option("--calib", required=True, help="Calibration text file the student learns to match the teacher on.")
@click.option("--teacher", default=None, help="Float model [the source model recorded in the directory].")
@click.option("--init", "init", type=click.Choice(["loftq", "zero"]), default="loftq", show_default=True)
@click.option("--loftq-iters", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--ce-weight", type=float, default=1.0, show_default=True, help="Weight of cross-entropy next to KL.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use at most this many windows.")
@click.option("--seq-len", type=click.IntRange(min=2), default=256, show_default=True)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False))
@train_options
def correct(quantized_dir: str, calib: str, teacher: str | None, init: str, loftq_iters: int, ce_weight: float,
            limit: int | None, seq_len: int, out_dir: str, rank: int, alpha: float | None, resume: bool,
            **given: Any) -> None:
    """LREC: train LoRA so the quantized model matches its float teacher (KL + cross-entropy)."""
    from engine.train.runs import correct as run_correct

    report = run_correct(
        quantized_dir, calib, out_dir, _train_config(given), teacher=teacher, rank=rank, alpha=_alpha(rank, alpha),
        init=init, loftq_iters=loftq_iters, ce_weight=ce_weight, seq_len=seq_len, limit=limit, resume=resume,
    )
    size = report["size"]
    click.echo(f"{out_dir}: corrected, {size['bits_per_weight']:.3f} bits/weight "
               f"({size['bits_per_weight_with_adapter']:.3f} with the adapter), {report['train_seconds']:.1f} s")


@cli.command()
@click.argument("run_dir")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False))
@click.option("--rank", type=click.IntRange(min=1), default=None, help="Cut a dynamic-rank adapter to this rank.")
@click.option("--merged", is_flag=True, help="Also write a merged float model (transformers format) to OUT/merged.")
def export(run_dir: str, out_dir: str, rank: int | None, merged: bool) -> None:
    """Export the adapter of a finetune or correct run as PEFT (and optionally a merged float model)."""
    from engine.train.runs import export_run

    result = export_run(run_dir, out_dir, rank, merged)
    click.echo(f"{out_dir}: adapter rank {result['rank']}" + (", merged model" if merged else ""))


@cli.command(name="plan")
@click.option("--model", "model_name", required=True,
              help="Built-in shape (llama-7b/13b/30b/65b, llama-2-70b, falcon-40b) or a config.json.")
@click.option("--bits", type=click.Choice(["2", "3", "4", "8"]), required=True)
@click.option("--rank", type=click.IntRange(min=1), required=True, help="LoRA rank.")
@click.option("--seq-len", type=click.IntRange(min=1), required=True)
@click.option("--batch", type=click.IntRange(min=1), required=True)
@click.option("--device-mem", default=None, help="Device memory, e.g. 24GiB (not with --device cpu).")
@click.option("--host-mem", required=True, help="Host memory, e.g. 64GiB.")
@click.option("--group-size", type=int, default=64, show_default=True)
@click.option("--tier", type=click.Choice(["auto", "device", "host", "disk"]), default="auto", show_default=True,
              help="Where the packed weights live; auto: the fastest that fits.")
@click.option("--prefetch", type=click.IntRange(min=0), default=1, show_default=True)
@click.option("--compute-dtype", type=click.Choice(["bfloat16", "float32"]), default="bfloat16", show_default=True)
@click.option("--optimizer-offload", type=click.Choice(["auto", "yes", "no"]), default="auto", show_default=True)
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default="cuda", show_default=True,
              help="cpu: the device is host RAM.")
@click.option("--disk-gbps", type=float, default=1.0, show_default=True)
@click.option("--h2d-gbps", type=float, default=25.0, show_default=True, help="Host-to-device copy rate.")
@click.option("--tflops", type=float, default=150.0, show_default=True, help="Matmul rate.")
@click.option("--dequant-gweights", type=float, default=50.0, show_default=True, help="Dequantization rate, G weights/s.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def plan_command(model_name: str, bits: str, device_mem: str | None, host_mem: str, as_json: bool,
                 **given: Any) -> None:
    """Predict the peak memory and step time of finetuning a model, from its shapes alone.

    Exit code 0 whether it fits or not; the verdict says which memory is short and what would fit.
    """
    from engine.offload.plan import PlanInputs, make_plan, parse_size
    from engine.offload.shapes import load_config, model_shapes

    host = parse_size(host_mem, "--host-mem")
    if device_mem is None and given["device"] == "cuda":
        raise EngineError("--device-mem is required with --device cuda")
    device = host if device_mem is None else parse_size(device_mem, "--device-mem")
    shapes = model_shapes(load_config(model_name))
    result = make_plan(PlanInputs(shapes, bits=int(bits), device_mem=device, host_mem=host, **given))
    if as_json:
        click.echo(json.dumps({"model": model_name, **result.to_json()}, indent=2))
    else:
        click.echo(result.render(model_name))


PLUGIN_GROUP = "modulora.commands"


def add_plugin_commands() -> None:
    """Commands other packages register under the ``modulora.commands`` entry-point group (``cluster``
    adds its Ray commands this way, so the engine never imports the cluster runner)."""
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
        _fail(f"{exc.filename or ''}: {exc.strerror}".lstrip(": "))


if __name__ == "__main__":
    main()
