"""Data-parallel finetuning on Ray Train, 2 CPU workers (gloo) on the shared model, each streaming the packed
blocks from disk and keeping DeepSpeed CPU Adam's state on the host: the same training as one process with the
same global batch, and a worker SIGKILLed mid-run restarted by Ray Train from the last checkpoint to the same
adapter, bit for bit."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from conftest import GGUF_MODEL, TRAIN_TXT, modulora

pytestmark = pytest.mark.slow  # Ray Train worker groups

STEPS, SAVE_EVERY = 12, 3
RUN = ["--data", TRAIN_TXT, "--seq-len", 64, "--limit", 64, "--steps", STEPS, "--batch-size", 4, "--rank", 4,
       "--save-every", SAVE_EVERY, "--keep-last", 5, "--offload", "disk", "--optimizer", "cpu_adam",
       "--offload-optimizer"]
WORKERS = ["--workers", 2, "--threads", 1]


@pytest.fixture(scope="module")
def ray_here():
    """One private Ray on 127.0.0.1 for the module's runs (each command leaves a running Ray to its owner)."""
    from cluster.runtime import ray_session

    with ray_session(num_cpus=2):
        yield


@pytest.fixture(scope="module")
def q4(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("q") / "q4"
    assert modulora("quantize", GGUF_MODEL, "--bits", 4, "--out", out) == 0
    return out


@pytest.fixture(scope="module")
def two_workers(q4, ray_here, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp") / "two"
    assert modulora("finetune", q4, *RUN, *WORKERS, "--out", out) == 0
    return out


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(next((run / "adapter").glob("*.safetensors")))


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max() / a[k].abs().max()) for k in a)


def test_two_workers_train_as_one_process_with_the_same_global_batch(q4, two_workers, tmp_path):
    report = json.loads((two_workers / "report.json").read_text())
    assert report["workers"] == 2 and report["examples"] == 64
    # Each worker's half of the global batch of 4 is one micro-batch of 2 of the one-process run: bit for bit.
    halves = tmp_path / "halves"
    assert modulora("finetune", q4, *RUN, "--batch-size", 2, "--grad-accum", 2, "--out", halves) == 0
    assert losses(two_workers) == losses(halves)
    parallel, accumulated = adapter(two_workers), adapter(halves)
    assert all(torch.equal(parallel[k], accumulated[k]) for k in parallel)
    # Against one batch of 4: the same sums in another float32 order, as the accumulated run is.
    one = tmp_path / "one"
    assert modulora("finetune", q4, *RUN, "--out", one) == 0
    assert max(abs(a - b) for a, b in zip(losses(one), losses(two_workers))) <= 1e-5
    relative = relative_difference(adapter(one), parallel)
    print(f"max relative difference of the adapters, 2 workers vs 1 process (batch 4): {relative:.3g}")
    assert relative <= 1e-3


def _kill_a_worker_after(checkpoint: Path, killed: list[int], stop: threading.Event) -> None:
    """SIGKILL one Ray Train worker process once ``checkpoint`` exists (the run is past it, not finished)."""
    while not stop.is_set() and not checkpoint.is_dir():
        time.sleep(0.01)
    for process in psutil.process_iter(["pid", "cmdline"]):
        if stop.is_set():
            return
        if "RayTrainWorker" in " ".join(process.info["cmdline"] or []):
            os.kill(process.info["pid"], signal.SIGKILL)
            killed.append(process.info["pid"])
            return


def test_a_killed_worker_is_restarted_from_the_last_checkpoint_to_the_same_adapter(q4, two_workers, tmp_path):
    out = tmp_path / "killed"
    killed: list[int] = []
    stop = threading.Event()
    killer = threading.Thread(target=_kill_a_worker_after,
                              args=(out / "checkpoints" / f"step-{2 * SAVE_EVERY:06d}", killed, stop))
    killer.start()
    try:
        code = modulora("finetune", q4, *RUN, *WORKERS, "--out", out)
    finally:
        stop.set()
        killer.join()
    assert code == 0 and killed, "no worker was killed"
    report = json.loads((out / "report.json").read_text())
    assert report["resumed_from_step"] >= 2 * SAVE_EVERY  # restarted by Ray Train from the newest checkpoint
    assert losses(out) == losses(two_workers)
    expected, got = adapter(two_workers), adapter(out)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
