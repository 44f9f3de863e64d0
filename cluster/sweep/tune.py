"""The sweep driver: every grid point a Ray Tune trial, retried on failure, an interrupted sweep continued.

The sweep directory::

    sweep.json        the sweep's spec; continuing needs the same one
    quantized/        cached quantized models, one per method / bits / group size
    runs/             one finetune run per grid point (a retried trial continues from its checkpoints)
    dynamic/          instead, for dynamic-rank sweeps: one QDyLoRA run per method / bits / group size / lr
    attempts.jsonl    one line per trial attempt, so retries and resumes show
    trial-results/    one checksummed JSON per finished trial: what a continued sweep reads back
    trials/           Ray Tune's experiments, one per invocation (run-1, run-2, ...): one directory per trial;
                      never read back (Tune restores from pickles, which could be planted)
    results.parquet   one row per trial
    pareto.png        the metric against bits per weight and against peak memory

On a multi-node cluster the sweep directory must be on storage every node sees.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from engine.errors import EngineError
from engine.options import as_plain
from engine.storage import atomic_write_json, output_lock

from cluster.runtime import ray_session
from cluster.sweep.records import read_records
from cluster.sweep.results import result_rows, write_results
from cluster.sweep.spec import Point, SweepSpec
from cluster.sweep.trial import run_point

if TYPE_CHECKING:
    from ray.tune.experiment import Trial

EXPERIMENT = "trials"


def run_trial(params: dict[str, Any], sweep: SweepSpec) -> None:
    """The Ray Tune function trainable: one grid point, one report."""
    from ray import tune

    tune.report(run_point(sweep, Point(**params["point"])))


def trial_dirname(trial: Trial) -> str:
    """Readable trial directories: the point's name, then Tune's trial id."""
    return f"{Point(**trial.config['point']).name}-{trial.trial_id}"


def _progress(metric: str) -> Any:
    """A Tune callback printing one line per trial outcome, in place of Tune's own tables (``verbose=0``)."""
    from ray import tune

    def name(trial: Trial) -> str:
        return Point(**trial.config["point"]).name

    class Progress(tune.Callback):
        def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
            r = trial.last_result
            click.echo(f"{name(trial)}: {metric} {r[metric]:.4f}, {r['bits_per_weight']:.3f} bits/weight, "
                       f"peak {r['peak_rss_mib']:.0f} MiB, {r['wall_s']:.1f} s")

        def on_trial_recover(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
            click.echo(f"{name(trial)}: attempt failed, retrying")

        def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
            click.echo(f"{name(trial)}: failed (see {trial.path}/error.txt)")

    return Progress()


def _claim(sweep: SweepSpec, resume: bool) -> None:
    """Record the spec in ``sweep.json``; a directory already holding a different sweep is refused, since its
    cached models, finished trials and results belong to that one."""
    record = Path(sweep.out) / "sweep.json"
    wanted = as_plain(sweep)
    if record.is_file():
        existing = json.loads(record.read_text())
        changed = [key for key in wanted if existing.get(key) != wanted[key]]
        if changed:
            raise EngineError(f"{sweep.out}: holds a sweep with a different {changed[0]!r}; use another output")
    elif resume:
        raise EngineError(f"{sweep.out}: no sweep to resume")
    else:
        atomic_write_json(record, wanted)


def trial_resources(sweep: SweepSpec) -> dict[str, float]:
    """What a trial asks Ray for: its CPU threads, and a whole GPU when the cluster has GPUs and the finetune
    may use one (its device is not cpu)."""
    import ray

    resources: dict[str, float] = {"cpu": sweep.cpus_per_trial}
    if sweep.finetune.device != "cpu" and ray.cluster_resources().get("GPU", 0) >= 1:
        resources["gpu"] = 1
    return resources


def _fresh_experiment(out: Path) -> str:
    """A new experiment name under ``trials/``: Tune writes its state there and nothing reads it back."""
    index = 1
    while (out / EXPERIMENT / f"run-{index}").exists():
        index += 1
    return f"run-{index}"


def run_sweep(sweep: SweepSpec, address: str | None = None, resume: bool = False) -> list[dict[str, Any]]:
    """Run (or continue) ``sweep``; returns one row per trial.  A sweep directory with finished trials is always
    continued: the points with a valid record (:mod:`cluster.sweep.records`) keep their results, the others run
    (again) as trials of a new Tune experiment."""
    out = Path(sweep.out)
    with output_lock(out):
        return _run(sweep, out, address, resume)


def _run(sweep: SweepSpec, out: Path, address: str | None, resume: bool) -> list[dict[str, Any]]:
    _claim(sweep, resume)
    points = sweep.points()
    todo = [point for point in points if point not in read_records(out, points)]
    if todo:
        with ray_session(address):
            from ray import tune

            trainable = tune.with_resources(tune.with_parameters(run_trial, sweep=sweep), trial_resources(sweep))
            tune.Tuner(
                trainable,
                param_space={"point": tune.grid_search([asdict(p) for p in todo])},
                tune_config=tune.TuneConfig(reuse_actors=False, trial_dirname_creator=trial_dirname),
                run_config=tune.RunConfig(
                    storage_path=str(out / EXPERIMENT),
                    name=_fresh_experiment(out),
                    failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
                    verbose=0,
                    callbacks=[_progress(sweep.metric)],
                ),
            ).fit()
    rows = result_rows(points, read_records(out, points), sweep.metric)
    write_results(rows, sweep.metric, out)
    return rows
