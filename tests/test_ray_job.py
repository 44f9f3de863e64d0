"""A real Ray head started with ``ray start --head`` on 127.0.0.1, and a recipe submitted to it with
``ray job submit --working-dir . -- python recipes/run.py RECIPE.yaml``, end to end; its correct and finetune
stages run on 2 Ray Train workers (``cluster.train_workers: 2``)."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest

from conftest import SHARED

pytestmark = pytest.mark.slow  # Ray clusters and subprocesses

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TINY_QUICKSTART = [  # the quickstart recipe at a few seconds per stage
    "quantize.calib.windows=4", "correct.init=zero", "correct.limit=8", "correct.seq_len=64",
    "correct.train.steps=2", "finetune.data.limit=16", "finetune.data.seq_len=64", "finetune.train.steps=2",
    "evaluate.tasks.0.limit=4", "evaluate.tasks.0.seq_len=64", "evaluate.models=[quantized,finetuned]",
    "cluster.train_workers=2",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening_addresses(marker: str) -> set[str]:
    """Addresses that processes whose command line mentions ``marker`` (the head's temp dir) listen on."""
    found: set[str] = set()
    for process in psutil.process_iter(["cmdline"]):
        try:
            if marker in " ".join(process.info["cmdline"] or []):
                found |= {c.laddr.ip for c in process.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
        except psutil.Error:
            continue
    return found


def test_ray_job_submit_runs_a_recipe_on_a_local_head(tmp_path):
    temp = tempfile.mkdtemp(prefix="rayhead", dir="/tmp")  # short: Ray's socket paths live under it
    dashboard = free_port()
    token = Path(temp) / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_ADDRESS": "",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # a single-node head: nothing binds beyond loopback
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}  # the head's own token, not ~/.ray's
    head = [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={free_port()}",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=2", f"--temp-dir={temp}",
            "--disable-usage-stats"]
    started = subprocess.run(head, env=env, capture_output=True, text=True, timeout=300)
    try:
        assert started.returncode == 0, started.stderr[-3000:]
        out = tmp_path / "out"
        job = [str(BIN / "ray"), "job", "submit", f"--address=http://127.0.0.1:{dashboard}", "--working-dir", ".",
               "--runtime-env-json", json.dumps({"env_vars": {"MODULORA_SHARED": str(SHARED)}}),
               "--", "python", "recipes/run.py", "recipes/quickstart.yaml", *TINY_QUICKSTART, f"output={out}"]
        done = subprocess.run(job, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
        assert "succeeded" in done.stdout
        addresses = listening_addresses(temp)
        assert addresses and addresses <= {"127.0.0.1", "::ffff:127.0.0.1", "::1"}, addresses
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)
    report = json.loads((out / "report.json").read_text())
    assert report["finished"] and set(report["stages"]) == {"quantize", "correct", "finetune", "evaluate", "export"}
    results = json.loads((out / "eval" / "results.json").read_text())
    assert set(results["finetuned"]["tinystories-valid"]["ranks"]) == {"1", "2", "4", "8"}
    assert (out / "export" / "merged" / "config.json").is_file()
    for trained in (out / "corrected" / "train", out / "finetuned"):
        assert json.loads((trained / "report.json").read_text())["workers"] == 2
        assert (trained / "ray").is_dir()  # Ray Train's copies of the run's checkpoints


def test_run_script_works_outside_the_checkout(tmp_path):
    """``ray submit CONFIG recipes/run.py -- RECIPE`` copies the script to the head's home directory and runs it
    there, beside the ``recipes`` link the cluster configs make: the script must work with the installed
    package, away from the checkout."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "run.py").write_bytes((ROOT / "recipes" / "run.py").read_bytes())
    (home / "recipes").symlink_to(ROOT / "recipes")
    done = subprocess.run([sys.executable, "run.py", "recipes/quickstart.yaml", "--dry-run"], cwd=home,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("quickstart: quantize -> correct -> finetune -> evaluate -> export")
    bad = subprocess.run([sys.executable, "run.py", "recipes/quickstart.yaml", "quantize.bits=5"], cwd=home,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1] == "modulora: error: quantize.bits: expected one of 2, 3, 4, 8, got 5"
