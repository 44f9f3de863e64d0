"""Calibration on Ray (2 workers) gives the same packed weights as one process, even when a worker dies, and moves
them without the object store."""

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
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import GGUF_MODEL, TRAIN_TXT, directory_tensors
from engine.model import open_source

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


def wider_checkpoint(path: Path) -> Path:
    """A random bf16 Llama block 512 wide (FFN 1408) in the Hugging Face layout: its sums and packed layers span
    many of the pieces Ray calibration sends them in (a ``down_proj``'s float64 X^T X is 16 MB)."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=512, intermediate_size=1408, num_hidden_layers=1, num_attention_heads=8,
                         num_key_value_heads=8, vocab_size=512, tie_word_embeddings=False)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    open_source(GGUF_MODEL).tokenizer().save_pretrained(path)
    return path


def object_store_pages(pid: int) -> int:
    """Bytes of shared memory (Ray's object store) mapped in process ``pid``'s RSS."""
    status = Path(f"/proc/{pid}/status").read_text()
    return next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("RssShmem:"))


def test_workers_send_sums_and_packed_layers_without_the_object_store(tmp_path):
    """Every sum and packed layer (up to 16 MB here) travels in pieces inside Ray's messages: no worker maps more
    than one inline object's worth (100 KiB) of the object store, whose pages would stay in its RSS (through the
    object store each held 4.6 MiB at hidden 1024), and the weights are still the one process's, bit for bit."""
    model = wider_checkpoint(tmp_path / "ckpt")
    args = [*OPTQ[:-1], "16", "--calib-seq-len", "128", "--shard-windows", "8", *MODES["sequential"]]
    finish(modulora("quantize", model, *args, "--out", tmp_path / "one"))
    proc = modulora("calibrate", model, *args, "--workers", "2", "--out", tmp_path / "ray")
    mapped: dict[int, int] = {}
    while proc.poll() is None:
        for worker in psutil.Process(proc.pid).children(recursive=True):
            try:
                if "ShardWorker" in " ".join(worker.cmdline()):
                    mapped[worker.pid] = max(mapped.get(worker.pid, 0), object_store_pages(worker.pid))
            except (psutil.Error, OSError):
                pass  # the worker ended meanwhile
        time.sleep(0.05)
    finish(proc)
    assert len(mapped) == 2 and max(mapped.values()) < 100 << 10, mapped
    assert_same(tmp_path / "one", tmp_path / "ray")
