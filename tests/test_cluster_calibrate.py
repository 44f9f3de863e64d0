"""Calibration on Ray (2 workers) gives the same packed weights as one process, even when a worker dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import torch

from conftest import GGUF_MODEL, TRAIN_TXT, directory_tensors

pytestmark = pytest.mark.slow  # Ray clusters and subprocesses

OPTQ = ["--method", "optq", "--bits", "3", "--group-size", "32", "--act-order", "--calib", str(TRAIN_TXT),
        "--calib-windows", "64"]
# Sequential: 2 shards, one per worker; independent: 4 shards of 16 windows, two per worker, so a worker adds the
# sum of the shards before it to its own two.
MODES = {"sequential": ["--calib-mode", "sequential", "--asym-alpha", "0.5"],
         "independent": ["--calib-mode", "independent", "--shard-windows", "16"]}
# One torch thread everywhere: the single process and the Ray workers then run the same kernels.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


def modulora(*args: object) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "engine.cli", *map(str, args)], env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(proc: subprocess.Popen) -> None:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return directory_tensors(directory)


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict[str, Path]:
    """``modulora quantize`` in one process, in both calibration modes."""
    root = tmp_path_factory.mktemp("single")
    for mode, extra in MODES.items():
        finish(modulora("quantize", GGUF_MODEL, *OPTQ, *extra, "--out", root / mode))
    return {mode: root / mode for mode in MODES}


def assert_same(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    assert [k for k in wa if not torch.equal(wa[k], wb[k])] == []


@pytest.mark.parametrize("mode", list(MODES))
def test_two_ray_workers_give_bit_identical_weights(single, tmp_path, mode):
    finish(modulora("calibrate", GGUF_MODEL, *OPTQ, *MODES[mode], "--workers", "2", "--out", tmp_path / "ray"))
    assert_same(single[mode], tmp_path / "ray")


def test_killed_worker_is_replaced_and_the_result_is_unchanged(single, tmp_path):
    """A worker killed once a group's layers were installed: its replacement replays them from the driver's
    scratch files."""
    started = time.time()
    proc = modulora("calibrate", GGUF_MODEL, *OPTQ, *MODES["sequential"], "--workers", "2", "--out", tmp_path / "ray")
    deadline, killed = time.time() + 300, None
    while killed is None and time.time() < deadline and proc.poll() is None:
        workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
                   if "ShardWorker" in " ".join(p.cmdline())]
        installed = [f for f in Path(tempfile.gettempdir()).glob("modulora-calibrate-*/install-*.safetensors")
                     if f.stat().st_mtime >= started]
        if len(workers) == 2 and installed:
            killed = workers[0].pid
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.05)
    assert killed is not None, "the run ended before a worker could be killed"
    finish(proc)
    assert_same(single["sequential"], tmp_path / "ray")
    assert not installed[0].exists(), "the scratch files outlive the run"


def test_ray_calibration_needs_calibration_data(tmp_path):
    proc = modulora("calibrate", GGUF_MODEL, "--method", "optq", "--out", tmp_path / "x")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and err.strip().count("\n") == 0 and "--calib" in err


def test_workers_beyond_the_shards_are_named(tmp_path):
    """32 windows are one 32-window shard: of 3 workers asked for, the command says only 1 holds windows, and the
    weights are still the one process's (it sums the same single shard)."""
    args = [a if a != "64" else "32" for a in OPTQ]
    finish(modulora("quantize", GGUF_MODEL, *args, "--calib-mode", "independent", "--out", tmp_path / "one"))
    proc = modulora("calibrate", GGUF_MODEL, *args, "--calib-mode", "independent", "--workers", "3",
                    "--out", tmp_path / "ray")
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert "32 calibration windows make 1 shard(s) of at most 32 windows: 1 of the 3 Ray workers" in err
    assert_same(tmp_path / "one", tmp_path / "ray")
