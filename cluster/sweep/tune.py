"""The sweep driver: every grid point a Ray Tune trial, retried on failure, an interrupted sweep continued.

The sweep directory::

    sweep.json        the sweep's spec; continuing needs the same one
    quantized/        cached quantized models, one per method / bits / group size
    runs/             one finetune run per grid point (a retried trial continues from its checkpoints)
    dynamic/          instead, for dynamic-rank sweeps: one QDyLoRA run per method / bits / group size / lr
    attempts.jsonl    one line per trial attempt, so retries and resumes show
    trials/           the Ray Tune experiment: one directory per trial
    results.parquet   one row per trial
    pareto.png        the metric against bits per weight and against peak memory

On a multi-node cluster the sweep directory must be on storage every node sees.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from engine.errors import EngineError
from engine.options import as_plain
from engine.storage import atomic_write_json

from cluster.runtime import ray_session
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


def run_sweep(sweep: SweepSpec, address: str | None = None, resume: bool = False) -> list[dict[str, Any]]:
    """Run (or continue) ``sweep``; returns one row per trial.  An existing experiment in the sweep directory
    is always continued: finished trials keep their results, interrupted and failed ones run again."""
    out = Path(sweep.out)
    _claim(sweep, resume)
    # Save Tune's experiment state every second (default: 10 s or more), so that an interrupted
    # sweep does not re-run trials that finished just before the interruption.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    experiment = out / EXPERIMENT
    with ray_session(address):
        from ray import tune

        trainable = tune.with_resources(tune.with_parameters(run_trial, sweep=sweep), trial_resources(sweep))
        if tune.Tuner.can_restore(experiment):
            tuner = tune.Tuner.restore(str(experiment), trainable, resume_errored=True)
        else:
            tuner = tune.Tuner(
                trainable,
                param_space={"point": tune.grid_search([asdict(p) for p in sweep.points()])},
                tune_config=tune.TuneConfig(reuse_actors=False, trial_dirname_creator=trial_dirname),
                run_config=tune.RunConfig(
                    storage_path=str(out),
                    name=EXPERIMENT,
                    failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
                    verbose=0,
                    callbacks=[_progress(sweep.metric)],
                ),
            )
        rows = result_rows(tuner.fit(), sweep.metric)
    write_results(rows, sweep.metric, out)
    return rows
