"""``modulora run RECIPE.yaml [key.path=value ...]`` and ``modulora sweep RECIPE.yaml``: a recipe's pipeline, or
its cluster sweep alone, from the command line.

Registered under the ``modulora.commands`` entry-point group, so the engine's
CLI never imports the recipes package.
"""

from __future__ import annotations

import shlex
import time
from pathlib import Path

import click

from engine.errors import EngineError
from engine.pipelines import command_line

from cluster.sweep import EXPERIMENT, format_table, run_sweep
from recipes.checks import plan_shape
from recipes.load import load_recipe
from recipes.runner import check_hardware, run_recipe
from recipes.specs import plan_spec, sweep_spec


@click.command(name="run")
@click.argument("recipe_file", metavar="RECIPE.yaml")
@click.argument("overrides", nargs=-1, metavar="[KEY.PATH=VALUE]...")
@click.option("--dry-run", is_flag=True, help="Validate the recipe (and plan it on its hardware); run nothing.")
def run_command(recipe_file: str, overrides: tuple[str, ...], dry_run: bool) -> None:
    """Run a recipe: quantize -> correct -> finetune -> evaluate -> export, as its sections say.

    Writes every artefact, report.json and report.md under the recipe's output
    directory.  Running it again skips stages already finished with the same
    inputs and continues an interrupted finetune from its last checkpoint.
    """
    recipe = load_recipe(recipe_file, overrides)
    plan = check_hardware(recipe)
    click.echo(f"{recipe.name}: {' -> '.join(recipe.stages)}; output {recipe.output}")
    if plan is not None:
        args = shlex.join(command_line(plan_spec(recipe, plan_shape(recipe))))
        click.echo(f"hardware: fits (modulora plan {args}): peak device "
                   f"{plan['device_peak_bytes'] / 2**30:.2f} GiB, host {plan['host_peak_bytes'] / 2**30:.2f} GiB, "
                   f"weights on {plan['tier']}, about {plan['time']['step_s']:.1f} s/step")
    if dry_run:
        return
    report = run_recipe(recipe)
    click.echo(f"{recipe.output}/report.md: {len(report['stages'])} stages, {report['seconds_this_run']:.1f} s")


@click.command(name="sweep")
@click.argument("recipe_file", metavar="RECIPE.yaml")
@click.argument("overrides", nargs=-1, metavar="[KEY.PATH=VALUE]...")
@click.option("--address", default=None, help="Ray cluster to run on [cluster.address, else a private Ray on "
              "127.0.0.1].")
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="Sweep directory [sweeps/RECIPE-NAME].")
@click.option("--resume", is_flag=True,
              help="Continue the interrupted sweep in --out (done anyway when it exists; this refuses to start anew).")
def sweep_command(recipe_file: str, overrides: tuple[str, ...], address: str | None, out_dir: str | None,
                  resume: bool) -> None:
    """Quantize, finetune and evaluate every point of a recipe's cluster.sweep grid on Ray Tune.

    Every setting of the recipe's quantize and finetune sections is carried into
    each trial.  Writes results.parquet (one row per trial) and pareto.png to
    --out and prints the table; '*' marks the Pareto front of the metric against
    bits per weight.  Re-running with the same --out continues the sweep and
    retries failed trials.
    """
    recipe = load_recipe(recipe_file, overrides)
    if recipe.sweep is None:
        raise EngineError(f"{recipe_file}: no cluster.sweep section to sweep")
    out = Path(out_dir if out_dir is not None else Path("sweeps") / recipe.name).resolve()
    spec = sweep_spec(recipe, out)
    start = time.perf_counter()
    rows = run_sweep(spec, address or recipe.get("cluster")["address"], resume)
    click.echo(format_table(rows, spec.metric))
    failed = sum(r["status"] != "ok" for r in rows)
    click.echo(f"{out}/results.parquet, {out}/pareto.png: {len(rows) - failed} of {len(rows)} trials ok, "
               f"{time.perf_counter() - start:.0f} s")
    if failed:
        raise EngineError(f"{failed} trial(s) failed (see {out / EXPERIMENT}/run-*/*/error.txt); run again to "
                          "retry them")
