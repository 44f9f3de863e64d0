"""Where a use case's training runs: in this process, or on a worker group that the cluster runner starts.

The engine does not import the cluster runner (it sits above the engine); the runner registers its launcher under
the ``modulora.launchers`` entry-point group, as it registers its commands under ``modulora.commands``.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path
from typing import Protocol

from engine.errors import EngineError
from engine.pipelines.specs import ParallelSpec
from engine.train import ONE_PROCESS, WorkerRun

LAUNCHER_GROUP = "modulora.launchers"
LAUNCHER = "ray-train"


class Launcher(Protocol):
    def __call__(self, run: WorkerRun, parallel: ParallelSpec, device: str, run_dir: Path, keep_last: int) -> None:
        """Run ``run`` on every worker of a group of ``parallel.workers``, computing on ``device``; the run's
        checkpoints (``keep_last`` kept) are written under ``run_dir`` by worker 0."""


def run_training(run: WorkerRun, parallel: ParallelSpec, device: str, run_dir: Path, keep_last: int) -> None:
    """``run`` in this process, or on the workers ``parallel`` asks for."""
    if not parallel.on_ray:
        run(ONE_PROCESS)
        return
    found = entry_points(group=LAUNCHER_GROUP, name=LAUNCHER)
    if not found:
        raise EngineError(f"--workers {parallel.workers}: no launcher {LAUNCHER!r} is installed (the project's "
                          "cluster package registers it: pip install -e . from the repository)")
    launcher: Launcher = next(iter(found)).load()
    launcher(run, parallel, device, run_dir, keep_last)

