"""Data-parallel training on Ray Train: the engine's finetune and correct, spread over a ``TorchTrainer`` group.

The use cases are the engine's own (:func:`engine.pipelines.finetune`, :func:`engine.pipelines.correct`); they
hand this launcher the function every worker runs, and the trainer does the rest (each worker's slice of the
global batch, DDP over the LoRA parameters only, worker 0's checkpoints):

* one worker per GPU (NCCL), or per CPU slot of ``--threads`` CPUs (gloo);
* every checkpoint worker 0 writes, in the project's checksummed format, is reported to Ray Train, which keeps
  its copies under ``RUN/ray``; when a worker or node dies, Ray Train restarts the group (``--max-failures``)
  and the workers resume from the last reported checkpoint, bit for bit;
* without ``--address`` Ray starts in this process on 127.0.0.1 with no dashboard.

    modulora finetune Q --data train.txt --batch-size 8 --workers 2 --out run
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from engine.errors import EngineError
from engine.pipelines import ParallelSpec
from engine.procstat import keep_heap_bounded
from engine.train import WorkerRun

from cluster.runtime import ray_session

STORAGE = "ray"  # Ray Train's folder inside the run directory
EXPERIMENT = "train"


class RayTrainGroup:
    """The worker group as a Ray Train worker sees it (made inside the worker, from its train context)."""

    continues = True

    def __init__(self) -> None:
        import ray.train

        context = ray.train.get_context()
        self.rank, self.size = context.get_world_rank(), context.get_world_size()

    @contextmanager
    def restored(self) -> Iterator[Path | None]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as folder:
            yield Path(folder)

    def report(self, metrics: dict[str, float], checkpoint: Path | None) -> None:
        import ray.train

        saved = ray.train.Checkpoint.from_directory(str(checkpoint)) if checkpoint is not None else None
        ray.train.report(metrics, checkpoint=saved)


def _worker_loop(config: dict[str, Any]) -> None:
    """What Ray Train runs on each worker: the engine's training with this worker's group, from the launching
    command's folder where this node has it (the spec's relative paths are relative to it), with the memory policy
    of a ``modulora`` process (what the planner's figures assume)."""
    torch.set_num_threads(config["threads"])
    keep_heap_bounded()
    if os.path.isdir(config["cwd"]):
        os.chdir(config["cwd"])
    config["run"](RayTrainGroup())


def launch(run: WorkerRun, parallel: ParallelSpec, device: str, run_dir: Path, keep_last: int) -> None:
    """Run ``run`` on ``parallel.workers`` Ray Train workers (the ``modulora.launchers`` entry point the engine's
    use cases call); a failure the group could not recover from is one line naming its cause."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    slots = parallel.workers * parallel.threads
    with ray_session(parallel.address, num_cpus=None if parallel.address else max(slots, os.cpu_count() or 1)):
        use_gpu = _gpu_workers(device)
        trainer = TorchTrainer(
            _worker_loop,
            train_loop_config={"run": run, "threads": parallel.threads, "cwd": os.getcwd()},
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=parallel.workers, use_gpu=use_gpu,
                                         resources_per_worker={"CPU": parallel.threads, **({"GPU": 1} if use_gpu else {})}),
            run_config=RunConfig(name=EXPERIMENT, storage_path=str((Path(run_dir) / STORAGE).resolve()),
                                 failure_config=FailureConfig(max_failures=parallel.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=keep_last)),
        )
        try:
            trainer.fit()
        except Exception as exc:  # Ray Train wraps the worker's own error; a user error stays one line
            cause = _engine_error(exc)
            if cause is None:
                raise
            raise EngineError(str(cause)) from None


def _gpu_workers(device: str) -> bool:
    """Whether the workers compute on GPUs: ``cuda`` asks for them; ``auto`` uses them when the cluster has any."""
    if device == "auto":
        import ray

        return ray.cluster_resources().get("GPU", 0) > 0
    return device == "cuda"


def _engine_error(exc: BaseException) -> EngineError | None:
    """The EngineError a worker raised, found in the chain of errors Ray Train wrapped it in."""
    seen: set[int] = set()
    stack = [exc]
    while stack:
        error = stack.pop()
        if id(error) in seen:
            continue
        seen.add(id(error))
        if isinstance(error, EngineError):
            return error
        stack += [e for e in (error.__cause__, error.__context__) if e is not None]
        stack += [e for e in getattr(error, "worker_failures", {}).values() if isinstance(e, BaseException)]
        stack += [e for e in getattr(error, "args", ()) if isinstance(e, BaseException)]
    return None
