"""DeepSpeed's CPU Adam after a build was killed: the build lock it left is waited for a bounded time, then removed
(torch's builder used to wait for it forever, so every later run hung)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from engine.offload.cpu_adam import STALE_BUILD_S, clear_stale_build_lock

BUILD = "cpu_adam"
STEP = """
import torch
from engine.offload.cpu_adam import cpu_adam
p = torch.nn.Parameter(torch.ones(8))
opt = cpu_adam([p], lr=0.1, weight_decay=0.0)
p.grad = torch.ones(8)
opt.step()
print(float(p[0]))
"""


def _default_build_folder() -> Path:
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(BUILD, verbose=False))


@pytest.mark.slow
def test_a_killed_builds_lock_no_longer_hangs_every_run(tmp_path):
    """A ``lock`` left in the op's build folder by a killed build, as old as a previous day's: an optimizer step
    still runs (the built op is copied in where there is one; else it is built)."""
    root = tmp_path / "extensions"
    folder = root / BUILD
    if (_default_build_folder() / f"{BUILD}.so").is_file():
        shutil.copytree(_default_build_folder(), folder)
    folder.mkdir(parents=True, exist_ok=True)
    baton = folder / "lock"
    baton.touch()
    old = time.time() - STALE_BUILD_S - 60
    os.utime(baton, (old, old))
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(root)}
    done = subprocess.run([sys.executable, "-c", STEP], env=env, capture_output=True, text=True, timeout=900,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.split()[-1]) == pytest.approx(0.9, abs=1e-6)  # AdamW's first step: lr * sign(grad)
    assert "left by a build that was killed" in done.stderr
    assert not baton.exists()


def test_a_young_lock_is_waited_for_then_removed(tmp_path):
    baton = tmp_path / "lock"
    baton.touch()
    start = time.monotonic()
    clear_stale_build_lock(baton, stale_s=1.5)
    assert 1.0 <= time.monotonic() - start < 10 and not baton.exists()


def test_a_lock_released_by_its_build_ends_the_wait(tmp_path):
    baton = tmp_path / "lock"
    baton.touch()
    threading.Timer(0.5, baton.unlink).start()  # the other build finishes
    start = time.monotonic()
    clear_stale_build_lock(baton, stale_s=60)
    assert time.monotonic() - start < 10
