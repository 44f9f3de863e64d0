"""One sweep trial, in a Ray worker: quantize (or reuse the cached model), finetune, evaluate, all in process
through the engine's use cases; the trial's peak memory covers finetuning and evaluation."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from engine.model import is_quantized_dir
from engine.pipelines import QuantizeSpec, evaluate, finetune, quantize
from engine.procstat import PeakRss, release_free_heap
from engine.storage import atomic_write_json

from cluster.sweep.records import write_record
from cluster.sweep.spec import Point, SweepSpec, Trial

ATTEMPTS = "attempts.jsonl"
KILL_FIRST_TRIAL = "MODULORA_TEST_KILL_FIRST_TRIAL"  # test hook: the first point's first attempt kills its worker


@contextmanager
def exclusive(lock_file: Path) -> Iterator[None]:
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


def ensure_quantized(spec: QuantizeSpec) -> None:
    """The quantized model of ``spec``, made by the first trial that needs it.  ``quantize`` builds the
    directory aside and renames it into place, so a manifest in place means a complete model, also after
    a worker died mid-write.  What quantizing leaves in the heap is handed back to the kernel."""
    target = Path(spec.out)
    with exclusive(target.with_name(target.name + ".lock")):
        if not is_quantized_dir(target):
            quantize(spec)
            release_free_heap()


def ensure_dynamic_run(trial: Trial, peak: Callable[[], int]) -> int:
    """Train the QDyLoRA run all ranks of a method / bits / group size / lr are evaluated from, in the first
    trial that needs it; returns the peak memory of its training (``peak()`` after it)."""
    run = Path(trial.finetune.out)
    done = run / "train_peak.json"  # written last: its presence means the run is complete
    with exclusive(run.with_name(run.name + ".lock")):
        if not done.is_file():
            finetune(trial.finetune)
            atomic_write_json(done, {"peak_rss_bytes": peak()})
    return json.loads(done.read_text())["peak_rss_bytes"]


def run_point(sweep: SweepSpec, point: Point) -> dict[str, Any]:
    """The metrics of one attempt at ``point``, also recorded as the point's finished-trial record."""
    import torch

    start = time.perf_counter()
    trial = sweep.trial(point)
    attempt = record_attempt(Path(sweep.out), point)
    torch.set_num_threads(sweep.cpus_per_trial)
    memory = PeakRss()
    ensure_quantized(trial.quantize)
    memory.reset()
    on_gpu = torch.cuda.is_available()  # Ray gave this trial a GPU (CUDA_VISIBLE_DEVICES): its peak is read there
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    train_peak = 0
    if trial.finetune.lora.dynamic:
        train_peak = ensure_dynamic_run(trial, memory.peak)
    else:
        finetune(trial.finetune)
    if os.environ.get(KILL_FIRST_TRIAL) and point == sweep.points()[0] and attempt == 1:
        os.kill(os.getpid(), signal.SIGKILL)  # test hook: a worker dying mid-trial (tests/test_sweep.py)
    report = evaluate(trial.evaluate, progress=False)
    (task,) = report["tasks"].values()
    metrics = task["ranks"][str(point.rank)] if "ranks" in task else task
    result = {
        "eval_ppl": metrics["ppl"],
        "eval_nll": metrics["nll"],
        "bits_per_weight": report["bits_per_weight"],
        "bits_per_weight_with_adapter": report["bits_per_weight_with_adapter"],
        "peak_rss_mib": max(memory.peak(), train_peak) / 2**20,
        **({"peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20} if on_gpu else {}),
        "wall_s": time.perf_counter() - start,
        "attempt": attempt,
    }
    write_record(sweep.out, point, result)
    return result
