"""The ``modulora`` command line.

Every user error (bad option, missing file, corrupt model directory) ends as one
line on stderr and exit code 2; tracebacks are for bugs only.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

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


@cli.command()
@click.argument("model")
@click.option("--method", default="rtn", show_default=True, help="Quantizer name (see `modulora info --methods`).")
@click.option("--bits", type=click.Choice(["2", "3", "4", "8"]), default="4", show_default=True)
@click.option("--group-size", type=int, default=32, show_default=True, help="Columns per scale; -1 for one per row.")
@click.option("--symmetric", is_flag=True, help="Symmetric grid (no zero points).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output directory.")
def quantize(model: str, method: str, bits: str, group_size: int, symmetric: bool, out_dir: str) -> None:
    """Quantize MODEL's decoder linear layers and save a quantized directory."""
    from engine.model import load_float_model, quantize_model, save_quantized
    from engine.quant import make_quantizer

    quantizer = make_quantizer(method, bits=int(bits), group_size=group_size, symmetric=symmetric)
    float_model, tokenizer = load_float_model(model)
    start = time.perf_counter()
    quantize_model(float_model, quantizer)
    seconds = time.perf_counter() - start
    source = str(Path(model).resolve()) if Path(model).exists() else model
    info = {"source_model": source, "quantizer": quantizer.describe(), "quantize_seconds": seconds}
    manifest = save_quantized(float_model, tokenizer, out_dir, info)
    size = manifest["size"]
    click.echo(
        f"{out_dir}: {len(manifest['layers'])} layers, {size['bits_per_weight']:.3f} bits/weight, "
        f"{size['model_bytes'] / 1e6:.2f} MB, {seconds:.1f} s"
    )


@cli.command(name="eval")
@click.argument("model")
@click.option("--data", required=True, help="UTF-8 text file.")
@click.option("--seq-len", type=click.IntRange(min=2), default=256, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def evaluate(model: str, data: str, seq_len: int, batch_size: int, as_json: bool) -> None:
    """Perplexity of MODEL (float model or quantized directory) on a text file."""
    from engine.eval import perplexity, read_text, token_windows
    from engine.model import load_model, model_size

    text = read_text(data)
    loaded, tokenizer, _ = load_model(model)
    result = perplexity(loaded, token_windows(tokenizer, text, seq_len), batch_size, progress=not as_json)
    report = {"model": model, "data": data, "seq_len": seq_len, **vars(result), **model_size(loaded)}
    if as_json:
        click.echo(json.dumps(report))
    else:
        click.echo(
            f"ppl {result.ppl:.4f} over {result.tokens} tokens ({result.windows} windows of {seq_len}); "
            f"{report['bits_per_weight']:.3f} bits/weight, {report['model_bytes'] / 1e6:.2f} MB"
        )


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


def main(argv: list[str] | None = None) -> None:
    """Console entry point: click's own errors and EngineError both become one line and exit code 2."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
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
