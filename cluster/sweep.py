"""``modulora sweep``: rank x bit-width sweeps on Ray Tune, and a Pareto plot of quality against size and memory.

A sweep config (YAML) names a model, training and evaluation text, and a grid
of quantization methods, bit widths, group sizes, LoRA ranks and learning
rates.  Every grid point is one Ray Tune trial: quantize the model (cached per
method / bits / group size in the sweep directory, so all ranks and learning
rates share it), finetune LoRA, measure perplexity, and report it with the
bits per weight, the trial's peak memory and its wall time.  With
``dynamic: {rank_max: R}`` (QDyLoRA) one dynamic-rank run is trained per
method / bits / group size / lr, and each rank in ``grid.rank`` (default
``1..R``) is a trial that evaluates that run cut to its rank.

The sweep directory (``--out``)::

    sweep.json        the validated config; resuming needs the same one
    quantized/        cached quantized models, one per method / bits / group size
    runs/             one finetune run per grid point (a retried trial continues from its checkpoints)
    dynamic/          instead, for dynamic sweeps: one QDyLoRA run per method / bits / group size / lr
    attempts.jsonl    one line per trial attempt, so retries and resumes show
    trials/           the Ray Tune experiment: one directory per trial
    results.parquet   one row per trial
    pareto.png        the metric against bits per weight and against peak memory

Paths in a config are relative to the config file; ``{shared}`` stands for the
shared models and data directory (``engine.paths.shared_dir()``).  On a
multi-node cluster ``--out`` must be on storage every node sees.
"""

from __future__ import annotations

import fcntl
import inspect
import io
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from engine.errors import EngineError
from engine.validate import (
    REQUIRED, boolean, choice, file, integer, later, listof, load_yaml, mapping, model, number, section, string,
)
from engine.storage import atomic_write_bytes, atomic_write_json

from cluster.runtime import ray_session

if TYPE_CHECKING:
    from ray.tune import ResultGrid
    from ray.tune.experiment import Trial

EXPERIMENT = "trials"
ATTEMPTS = "attempts.jsonl"
METRICS = ("eval_ppl", "eval_nll")  # both minimised
RESULT_COLUMNS = {  # of results.parquet; "metric" is the config's metric, named in the file's metadata
    "method": "string", "bits": "int64", "group_size": "int64", "rank": "int64", "lr": "float64",
    "metric": "float64", "bits_per_weight": "float64", "bits_per_weight_with_adapter": "float64",
    "peak_rss_mib": "float64", "wall_s": "float64", "attempt": "int64", "status": "string",
}

# --------------------------------------------------------------------------------------------------
# The config


@dataclass(frozen=True)
class Point:
    """One trial: a quantized model (method, bits, group size) finetuned at a LoRA rank and learning rate."""

    method: str
    bits: int
    group_size: int | None  # None: the method has no groups (e.g. quip)
    rank: int
    lr: float

    @property
    def quantized_name(self) -> str:
        groups = f"-g{self.group_size}" if self.group_size is not None else ""
        return f"{self.method}-{self.bits}bit{groups}"

    @property
    def name(self) -> str:
        return f"{self.quantized_name}-r{self.rank}-lr{self.lr:g}"


@dataclass(frozen=True)
class FinetuneSettings:
    steps: int
    batch_size: int
    seq_len: int
    limit: int | None  # training windows
    warmup_steps: int
    seed: int
    save_every: int  # checkpoints let a retried trial continue where its worker died


@dataclass(frozen=True)
class CalibSettings:
    """OPTQ-style calibration: ``windows`` random 256-token windows of ``file`` (``modulora quantize --calib``)."""

    file: str
    windows: int
    seed: int


@dataclass(frozen=True)
class SweepConfig:
    """A validated sweep config: paths made absolute, the grid expanded into its points."""

    model: str
    data: str
    eval_data: str
    points: tuple[Point, ...]
    finetune: FinetuneSettings
    calib: CalibSettings | None
    rank_max: int | None  # QDyLoRA: one dynamic run per method / bits / group size / lr
    metric: str
    eval_windows: int
    eval_seq_len: int
    cpus_per_trial: int
    max_failures: int
    test_kill_first_trial: bool  # test hook: the first point's first attempt kills its own worker


def load_config(config_file: str | Path) -> SweepConfig:
    """Read and validate a sweep config; every problem is an EngineError naming the key."""
    return read_config(load_yaml(config_file), Path(config_file).resolve().parent)


def read_config(raw: Any, base: Path) -> SweepConfig:
    """Validate a parsed sweep config whose relative paths are relative to ``base``."""
    top = section(raw, "", {
        "model": (model(base), REQUIRED),
        "data": (file(base), REQUIRED),
        "eval_data": (file(base), REQUIRED),
        "grid": (later, REQUIRED),
        "dynamic": (mapping({"rank_max": (integer(1), REQUIRED)}), None),
        "finetune": (later, {}),
        "calib": (later, None),
        "metric": (choice(METRICS), "eval_ppl"),
        "eval_windows": (integer(1), 64),
        "eval_seq_len": (integer(2), 256),
        "resources_per_trial": (mapping({"cpu": (integer(1), 1)}), {"cpu": 1}),
        "max_failures": (integer(0), 2),
        "test_kill_first_trial": (boolean, False),
    })
    rank_max = top["dynamic"]["rank_max"] if top["dynamic"] else None
    finetune = FinetuneSettings(**section(top["finetune"], "finetune", {
        "steps": (integer(1), 100),
        "batch_size": (integer(1), 8),
        "seq_len": (integer(2), 256),
        "limit": (integer(1), None),
        "warmup_steps": (integer(0), 0),
        "seed": (integer(0), 0),
        "save_every": (integer(0), 0),
    }))
    calib = None
    if top["calib"] is not None:
        calib = CalibSettings(**section(top["calib"], "calib", {
            "file": (file(base), REQUIRED),
            "windows": (integer(1), 128),
            "seed": (integer(0), 0),
        }))
    points = _grid_points(top["grid"], rank_max, calib is not None)
    return SweepConfig(
        model=top["model"], data=top["data"], eval_data=top["eval_data"], points=points, finetune=finetune,
        calib=calib, rank_max=rank_max, metric=top["metric"], eval_windows=top["eval_windows"],
        eval_seq_len=top["eval_seq_len"], cpus_per_trial=top["resources_per_trial"]["cpu"],
        max_failures=top["max_failures"], test_kill_first_trial=top["test_kill_first_trial"],
    )


def _grid_points(raw: Any, rank_max: int | None, has_calib: bool) -> tuple[Point, ...]:
    """Every combination of the grid, ranks outermost: the first trials to run then quantize different
    models in parallel instead of queueing for the same one.  Each quantizer is built once here, so a
    bad method or bit width fails before Ray starts."""
    grid = section(raw, "grid", {
        "method": (listof(string), REQUIRED),
        "bits": (listof(integer(1)), REQUIRED),
        "group_size": (listof(integer(-1)), REQUIRED),
        "rank": (listof(integer(1)), REQUIRED if rank_max is None else None),
        "lr": (listof(number()), REQUIRED),
    })
    ranks = grid["rank"] or list(range(1, rank_max + 1))
    if rank_max is not None and max(ranks) > rank_max:
        raise EngineError(f"grid.rank: {max(ranks)} is above dynamic.rank_max {rank_max}")
    points: dict[Point, None] = {}  # ordered and de-duplicated (group sizes collapse for methods without)
    axes = (ranks, grid["lr"], grid["method"], grid["bits"], grid["group_size"])
    for rank, lr, method, bits, group_size in itertools.product(*axes):
        point = Point(method, bits, group_size if _takes_groups(method) else None, rank, lr)
        if quantizer_for(point, "grid").needs_calibration and not has_calib:
            raise EngineError(f"grid.method: {method!r} needs calibration data: add calib: {{file: ...}}")
        points[point] = None
    return tuple(points)


def _takes_groups(method: str) -> bool:
    from engine.quant import QUANTIZERS, make_quantizer

    if method not in QUANTIZERS:
        make_quantizer(method)  # raises the "unknown method" error listing the allowed ones
    return "group_size" in inspect.signature(QUANTIZERS[method]).parameters


def quantizer_for(point: Point, where: str = "") -> Any:
    """The quantizer of ``point``'s method at its bits and group size."""
    from engine.quant import make_quantizer

    settings: dict[str, int] = {"bits": point.bits}
    if point.group_size is not None:
        settings["group_size"] = point.group_size
    try:
        return make_quantizer(point.method, **settings)
    except (EngineError, TypeError) as exc:
        raise EngineError(f"{where + ': ' if where else ''}{point.quantized_name}: {exc}") from None


# --------------------------------------------------------------------------------------------------
# One trial (runs in a Ray worker)


@contextmanager
def _exclusive(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_file`` (released by the kernel if this process dies), so trials
    racing for the same cache entry build it once and never see it half-written."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def record_attempt(sweep_dir: Path, point: Point) -> int:
    """Append this attempt to ``attempts.jsonl``; returns which attempt at ``point`` it is (1 for the first)."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    with open(sweep_dir / ATTEMPTS, "a+") as log:
        fcntl.flock(log, fcntl.LOCK_EX)
        log.seek(0)
        attempt = 1 + sum(json.loads(line)["point"] == point.name for line in log.read().splitlines() if line)
        record = {"point": point.name, "attempt": attempt, "pid": os.getpid(), "time": time.time()}
        log.write(json.dumps(record) + "\n")
        log.flush()
        fcntl.flock(log, fcntl.LOCK_UN)
    return attempt


def ensure_quantized(config: SweepConfig, point: Point, sweep_dir: Path) -> Path:
    """The quantized model of ``point``'s method / bits / group size, made by the first trial that needs it.

    ``modulora quantize`` builds the directory aside and renames it into place,
    so a manifest in place means a complete model, also after a worker died
    mid-write.
    """
    from engine.model import is_quantized_dir

    target = sweep_dir / "quantized" / point.quantized_name
    with _exclusive(target.with_name(target.name + ".lock")):
        if not is_quantized_dir(target):
            quantize_in_child(config, point, target)
    return target


def quantize_in_child(config: SweepConfig, point: Point, target: Path) -> None:
    """``modulora quantize`` in a child process, so what quantizing leaves in memory does not count
    towards the peak of whichever trial happened to fill the cache."""
    args = ["quantize", config.model, "--method", point.method, "--bits", str(point.bits), "--out", str(target)]
    if point.group_size is not None:
        args += ["--group-size", str(point.group_size)]
    if quantizer_for(point).needs_calibration:
        c = config.calib
        args += ["--calib", c.file, "--calib-windows", str(c.windows), "--seed", str(c.seed)]
    child = subprocess.run([sys.executable, "-m", "engine.cli", *args], capture_output=True, text=True)
    if child.returncode != 0:
        raise RuntimeError(f"modulora {' '.join(args)} failed:\n{child.stderr}")


def _finetune(config: SweepConfig, quantized: Path, run_dir: Path, rank: int, lr: float, dynamic: bool) -> None:
    """LoRA (QDyLoRA when ``dynamic``) on the quantized model, continuing from ``run_dir``'s last checkpoint if any."""
    from engine.data import FormatSpec
    from engine.train import TrainConfig
    from engine.train.runs import finetune

    f = config.finetune
    train = TrainConfig(steps=f.steps, batch_size=f.batch_size, lr=lr, warmup_steps=f.warmup_steps, seed=f.seed,
                        save_every=f.save_every, rank_max=rank if dynamic else None)
    finetune(str(quantized), config.data, FormatSpec("text"), run_dir, train, rank=rank, alpha=2.0 * rank,
             seq_len=f.seq_len, limit=f.limit, resume=True)


def ensure_dynamic_run(
    config: SweepConfig, point: Point, quantized: Path, sweep_dir: Path, peak: Callable[[], int]
) -> tuple[Path, int]:
    """The QDyLoRA run all ranks of ``point``'s method / bits / group size / lr are evaluated from, trained by
    the first trial that needs it; returns it and the peak memory of its training (``peak()`` after it)."""
    run_dir = sweep_dir / "dynamic" / f"{point.quantized_name}-lr{point.lr:g}-rmax{config.rank_max}"
    done = run_dir / "train_peak.json"  # written last: its presence means the run is complete
    with _exclusive(run_dir.with_name(run_dir.name + ".lock")):
        if not done.is_file():
            _finetune(config, quantized, run_dir, config.rank_max, point.lr, dynamic=True)
            atomic_write_json(done, {"peak_rss_bytes": peak()})
    return run_dir, json.loads(done.read_text())["peak_rss_bytes"]


def evaluate_point(config: SweepConfig, point: Point, sweep_dir: Path) -> dict[str, float]:
    """Quantize (or reuse the cached model), finetune, evaluate: the metrics of one trial attempt.

    The peak memory covers finetuning and evaluation, not the quantization that
    only the first trial of a cache entry does, so trials compare fairly.
    """
    start = time.perf_counter()
    attempt = record_attempt(sweep_dir, point)
    import torch

    from engine.eval import perplexity, read_text, token_windows
    from engine.model import model_size
    from engine.procstat import PeakRss
    from engine.train import set_active_rank
    from engine.train.runs import load_with_adapter

    torch.set_num_threads(config.cpus_per_trial)
    torch.manual_seed(config.finetune.seed)
    memory = PeakRss()
    quantized = ensure_quantized(config, point, sweep_dir)
    memory.reset()
    train_peak = 0
    if config.rank_max is None:
        run_dir = sweep_dir / "runs" / point.name
        _finetune(config, quantized, run_dir, point.rank, point.lr, dynamic=False)
    else:
        run_dir, train_peak = ensure_dynamic_run(config, point, quantized, sweep_dir, memory.peak)
    if config.test_kill_first_trial and point == config.points[0] and attempt == 1:
        os.kill(os.getpid(), signal.SIGKILL)  # test hook: a worker dying mid-trial (tests/test_sweep.py)
    model, tokenizer, _ = load_with_adapter(run_dir)
    if config.rank_max is not None:
        set_active_rank(model, point.rank)
    windows = token_windows(tokenizer, read_text(config.eval_data), config.eval_seq_len)[: config.eval_windows]
    result = perplexity(model, windows, progress=False)
    size = model_size(model)
    return {
        "eval_ppl": result.ppl,
        "eval_nll": result.nll,
        "bits_per_weight": size["bits_per_weight"],
        "bits_per_weight_with_adapter": size["bits_per_weight_with_adapter"],
        "peak_rss_mib": max(memory.peak(), train_peak) / 2**20,
        "wall_s": time.perf_counter() - start,
        "attempt": attempt,
    }


def run_trial(params: dict[str, Any], config: SweepConfig, sweep_dir: str) -> None:
    """The Ray Tune function trainable: one grid point, one report."""
    from ray import tune

    tune.report(evaluate_point(config, Point(**params["point"]), Path(sweep_dir)))


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


# --------------------------------------------------------------------------------------------------
# The driver


def _claim_sweep_dir(out_dir: Path, config: SweepConfig, resume: bool) -> None:
    """Record the config in ``sweep.json``; a directory already holding a different sweep is refused,
    since its cached models, finished trials and results belong to that one."""
    record = out_dir / "sweep.json"
    wanted = json.loads(json.dumps(asdict(config)))
    if record.is_file():
        existing = json.loads(record.read_text())
        changed = [key for key in wanted if existing.get(key) != wanted[key]]
        if changed:
            raise EngineError(f"{out_dir}: holds a sweep with a different {changed[0]!r}; use another --out")
    elif resume:
        raise EngineError(f"{out_dir}: no sweep to resume")
    else:
        atomic_write_json(record, wanted)


def run_sweep(
    config_file: str | Path, out_dir: str | Path, address: str | None = None, resume: bool = False
) -> tuple[SweepConfig, list[dict[str, Any]]]:
    """Run (or continue) the sweep of ``config_file`` in ``out_dir``; returns the config and one row per trial.

    An existing experiment in ``out_dir`` is always continued: finished trials
    keep their results, interrupted and failed ones run again.
    """
    config = load_config(config_file)
    out_dir = Path(out_dir).resolve()
    _claim_sweep_dir(out_dir, config, resume)
    # Save Tune's experiment state every second (default: 10 s or more), so that an interrupted
    # sweep does not re-run trials that finished just before the interruption.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    experiment = out_dir / EXPERIMENT
    with ray_session(address):
        from ray import tune

        trainable = tune.with_resources(
            tune.with_parameters(run_trial, config=config, sweep_dir=str(out_dir)), {"cpu": config.cpus_per_trial}
        )
        if tune.Tuner.can_restore(experiment):
            tuner = tune.Tuner.restore(str(experiment), trainable, resume_errored=True)
        else:
            tuner = tune.Tuner(
                trainable,
                param_space={"point": tune.grid_search([asdict(p) for p in config.points])},
                tune_config=tune.TuneConfig(reuse_actors=False, trial_dirname_creator=trial_dirname),
                run_config=tune.RunConfig(
                    storage_path=str(out_dir),
                    name=EXPERIMENT,
                    failure_config=tune.FailureConfig(max_failures=config.max_failures),
                    verbose=0,
                    callbacks=[_progress(config.metric)],
                ),
            )
        rows = result_rows(tuner.fit(), config.metric)
    write_results(rows, config.metric, out_dir)
    return config, rows


def result_rows(grid: ResultGrid, metric: str) -> list[dict[str, Any]]:
    """One row per trial, in grid order (method, bits, group size, rank, lr); failed trials get NaNs."""
    rows = []
    for result in grid:
        reported = result.metrics or {}
        rows.append({
            **asdict(Point(**result.config["point"])),
            "metric": float(reported.get(metric, math.nan)),
            "bits_per_weight": float(reported.get("bits_per_weight", math.nan)),
            "bits_per_weight_with_adapter": float(reported.get("bits_per_weight_with_adapter", math.nan)),
            "peak_rss_mib": float(reported.get("peak_rss_mib", math.nan)),
            "wall_s": float(reported.get("wall_s", math.nan)),
            "attempt": int(reported.get("attempt", 0)),
            "status": "ok" if result.error is None else "error",
        })
    return sorted(rows, key=lambda r: (r["method"], r["bits"], r["group_size"] or 0, r["rank"], r["lr"]))


def pareto_front(costs: list[tuple[float, ...]]) -> list[bool]:
    """For each point (all coordinates minimised): is it on the front, i.e. does no other point cost at
    most as much in every coordinate and less in one?"""
    return [
        not any(other != mine and all(o <= m for o, m in zip(other, mine)) for other in costs) for mine in costs
    ]


def _finished(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r["status"] == "ok" and math.isfinite(r["metric"])]


def write_results(rows: list[dict[str, Any]], metric: str, out_dir: Path) -> None:
    """``results.parquet`` (the metric's name in the schema metadata) and ``pareto.png``, each written atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([(name, pa.type_for_alias(kind)) for name, kind in RESULT_COLUMNS.items()],
                       metadata={"metric": metric})
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), sink)
    atomic_write_bytes(out_dir / "results.parquet", sink.getvalue().to_pybytes())
    atomic_write_bytes(out_dir / "pareto.png", pareto_png(_finished(rows), metric))


def pareto_png(rows: list[dict[str, Any]], metric: str) -> bytes:
    """Two panels, the metric against bits per weight and against peak memory, each with its Pareto front."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.5))
    axes = fig.subplots(1, 2, sharey=True)
    panels = (("bits_per_weight", "bits per weight"), ("peak_rss_mib", "peak RSS of the trial (MiB)"))
    for ax, (x_key, label) in zip(axes, panels):
        for method in sorted({r["method"] for r in rows}):
            mine = [r for r in rows if r["method"] == method]
            ax.scatter([r[x_key] for r in mine], [r["metric"] for r in mine], label=method, alpha=0.7)
        front = [r for r, on in zip(rows, pareto_front([(r[x_key], r["metric"]) for r in rows])) if on]
        front.sort(key=lambda r: r[x_key])
        ax.step([r[x_key] for r in front], [r["metric"] for r in front], where="post", color="black", lw=1,
                label="Pareto front")
        ax.scatter([r[x_key] for r in front], [r["metric"] for r in front], s=120, facecolors="none",
                   edgecolors="black")
        for r in front:
            ax.annotate(f"{r['method']} {r['bits']}b r{r['rank']}", (r[x_key], r["metric"]), xytext=(4, 4),
                        textcoords="offset points", fontsize=8)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"{metric} (lower is better)")
    axes[0].legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    return buffer.getvalue()


def format_table(rows: list[dict[str, Any]], metric: str) -> str:
    """The results as a text table; ``*`` marks the Pareto front of the metric against bits per weight."""
    finished = _finished(rows)
    on_front = pareto_front([(r["bits_per_weight"], r["metric"]) for r in finished])
    front = {id(r) for r, on in zip(finished, on_front) if on}
    lines = [f"{'method':<8} {'bits':>4} {'group':>5} {'rank':>4} {'lr':>8} {metric:>10} {'bits/w':>7} "
             f"{'+adapter':>8} {'peak MiB':>8} {'wall s':>7} {'try':>3}  status"]
    for r in rows:
        group = "-" if r["group_size"] is None else str(r["group_size"])
        mark = " *" if id(r) in front else ""
        lines.append(
            f"{r['method']:<8} {r['bits']:>4} {group:>5} {r['rank']:>4} {r['lr']:>8.2g} {r['metric']:>10.4f} "
            f"{r['bits_per_weight']:>7.3f} {r['bits_per_weight_with_adapter']:>8.3f} {r['peak_rss_mib']:>8.1f} "
            f"{r['wall_s']:>7.1f} {r['attempt']:>3}  {r['status']}{mark}"
        )
    return "\n".join(lines)


@click.command(name="sweep")
@click.argument("config_file", metavar="CONFIG.yaml", type=click.Path(dir_okay=False))
@click.option("--address", default=None, help="Ray cluster to run on [a private Ray on 127.0.0.1].")
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="Sweep directory [sweeps/CONFIG-NAME].")
@click.option("--resume", is_flag=True,
              help="Continue the interrupted sweep in --out (done anyway when it exists; this refuses to start anew).")
def sweep_command(config_file: str, address: str | None, out_dir: str | None, resume: bool) -> None:
    """Quantize, finetune and evaluate every point of a rank x bit-width grid on Ray Tune.

    Writes results.parquet (one row per trial) and pareto.png to --out and
    prints the table; '*' marks the Pareto front of the metric against bits per
    weight.  Re-running with the same --out continues the sweep and retries
    failed trials.
    """
    out = Path(out_dir) if out_dir is not None else Path("sweeps") / Path(config_file).stem
    start = time.perf_counter()
    config, rows = run_sweep(config_file, out, address, resume)
    click.echo(format_table(rows, config.metric))
    failed = sum(r["status"] != "ok" for r in rows)
    click.echo(f"{out}/results.parquet, {out}/pareto.png: {len(rows) - failed} of {len(rows)} trials ok, "
               f"{time.perf_counter() - start:.0f} s")
    if failed:
        raise EngineError(f"{failed} trial(s) failed (see {out / EXPERIMENT}/*/error.txt); run again to retry them")
