"""``modulora run RECIPE.yaml [key.path=value ...]``: a recipe's pipeline from the command line.

Registered under the ``modulora.commands`` entry-point group, so the engine's
CLI never imports the recipes package.
"""

from __future__ import annotations

import click

from recipes.runner import check_hardware, run_recipe
from recipes.schema import load_recipe, plan_arguments


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
        click.echo(f"hardware: fits (modulora plan {' '.join(plan_arguments(recipe))}): peak device "
                   f"{plan['device_peak_bytes'] / 2**30:.2f} GiB, host {plan['host_peak_bytes'] / 2**30:.2f} GiB, "
                   f"weights on {plan['tier']}, about {plan['time']['step_s']:.1f} s/step")
    if dry_run:
        return
    report = run_recipe(recipe)
    click.echo(f"{recipe.output}/report.md: {len(report['stages'])} stages, {report['seconds_this_run']:.1f} s")
