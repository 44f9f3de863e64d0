"""DeepSpeed's CPU Adam, built on first use without the hang a killed build used to leave.

torch's extension builder marks a build in progress with a ``lock`` file in
the build folder and waits, without end, while that file exists: a run killed
during the first build (about a minute here) stopped every later run forever.
Builds by this engine are serialised by an ``flock`` beside the build folder,
which the kernel drops when its holder dies; under it, a ``lock`` file belongs
to a dead build or to another program's.  It is waited for until it is
:data:`STALE_BUILD_S` old (no build takes that long), then removed.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

STALE_BUILD_S = 600.0  # a build lock older than this was left by a killed build
POLL_S = 1.0

log = logging.getLogger(__name__)


def _build_op() -> None:
    """Load DeepSpeed's CPU Adam op, building it first if needed (its builder caches the loaded op)."""
    from deepspeed.ops.op_builder import CPUAdamBuilder
    from torch.utils.cpp_extension import _get_build_directory  # where torch's load() builds the op

    builder = CPUAdamBuilder()
    folder = Path(_get_build_directory(builder.name, verbose=False))
    fd = os.open(folder.parent / f".{builder.name}.modulora.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another modulora process building: it finishes, or dies and lets go
        clear_stale_build_lock(folder / "lock")
        builder.load()
    finally:
        os.close(fd)


def clear_stale_build_lock(baton: Path, stale_s: float = STALE_BUILD_S) -> None:
    """Wait while ``baton`` exists and is younger than ``stale_s``; then remove it, if still there."""
    waited = False
    while baton.exists():
        try:
            age = time.time() - baton.stat().st_mtime
        except FileNotFoundError:
            return
        if age >= stale_s:
            log.warning("removing %s: a CPU Adam build lock %.0f s old, left by a build that was killed", baton, age)
            baton.unlink(missing_ok=True)
            return
        if not waited:
            log.warning("waiting for %s (another CPU Adam build, or one killed less than %.0f s ago)", baton, stale_s)
            waited = True
        time.sleep(POLL_S)


def cpu_adam(params: list[torch.Tensor], lr: float, weight_decay: float) -> Any:
    """DeepSpeed's vectorised CPU AdamW over ``params`` (host tensors)."""
    _build_op()
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    return DeepSpeedCPUAdam(params, lr=lr, weight_decay=weight_decay, adamw_mode=True)
