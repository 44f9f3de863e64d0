"""Calibration on Ray: the engine's calibration shards on Ray workers, layers quantized in parallel.

The use case is the engine's own (:func:`engine.pipelines.quantize`, whose driver loop is
:func:`engine.model.quantize_calibrated`); this module only supplies its
:class:`~engine.model.ShardRunner` on Ray:

* each worker (an actor) builds the model on ``meta`` with its embeddings,
  reads each decoder block from the checkpoint when the driver starts it and
  releases it after (never a whole float model), and holds a contiguous run of
  the calibration shards; the windows go through Ray's object store once;
* shard statistics come back per shard and the driver sums them in shard
  order, exactly as one process does, so the weights are bit-identical;
* the layers of a group are quantized in parallel, spread over the same
  workers (actors hold their CPUs, so separate tasks could starve), and the
  packed results are sent to the workers once per group (one ``ray.put``);
* a worker that dies is replaced: the new one replays the calls that changed
  its state (blocks begun and ended, layers installed) and the lost call is
  asked again;
* with ``--device cuda`` each worker asks Ray for a GPU (or a share of one) and
  computes there, handing back host tensors; the driver's sums stay on its CPU.

    modulora calibrate MODEL --method optq --bits 3 --calib train.txt --workers 2 --out q3
"""

from __future__ import annotations

import logging
import os
from typing import Any

import click
import torch
from torch import nn

from engine.errors import EngineError
from engine.lora import ModuLoRALinear
from engine.model import (
    CalibrationShard, ShardRunner, Wrap, decoder_blocks, linear_weight, load_block, load_outside_blocks, meta_model,
    open_source, place, release_block, swap_linear, worker_spans,
)
from engine.placement import resolve_device
from engine.procstat import keep_heap_bounded
from engine.pipelines import as_params, quantize, quantize_options, quantize_spec
from engine.quant import LayerStats, Quantizer, weight_from_state

from cluster.runtime import ray_session

log = logging.getLogger(__name__)
STATEFUL_CALLS = ("begin_block", "end_block")  # what a replacement worker must replay (with installs)

LayerState = tuple[dict[str, torch.Tensor], dict[str, Any], torch.Tensor | None]  # tensors, manifest, bias


class ShardWorker:
    """A Ray actor: the float model and a run of calibration shards, kept in step with the driver.  It computes
    on ``device`` (the GPU Ray gave it, for ``cuda``) and hands back host tensors."""

    def __init__(self, model_source: str, windows: torch.Tensor, spans: list[tuple[int, int]], batch_size: int,
                 asym: bool, threads: int, device: str = "cpu") -> None:
        torch.set_num_threads(threads)
        keep_heap_bounded()
        self.device = torch.device(device)
        source = open_source(model_source)
        self.model = meta_model(source.config)
        load_outside_blocks(self.model, source, head=False)  # the windows start at the input embeddings
        place(self.model, self.device)
        self.source = source
        self.shards = [CalibrationShard(self.model, windows[a:b], batch_size, asym) for a, b in spans]

    def call(self, method: str, *args: Any) -> list[Any]:
        """``method`` on every shard; a block is read from the checkpoint before its ``begin_block`` and
        released after its ``end_block``."""
        if method == "begin_block":
            load_block(self.model, args[0], self.source)
            place(decoder_blocks(self.model)[args[0]], self.device)
        results = [on_host(getattr(shard, method)(*args)) for shard in self.shards]
        if method == "end_block":
            release_block(self.model, args[0])
        return results

    def quantize(self, weight: torch.Tensor, stats: LayerStats, quantizer: Quantizer) -> tuple[dict, dict]:
        """One layer's packed tensors and manifest (workers quantize a group's layers in parallel)."""
        stats = LayerStats(stats.xtx.to(self.device), stats.count)
        qweight = quantizer.quantize(weight.to(self.device), stats)
        return on_host(dict(qweight.state_dict())), qweight.manifest()

    def install(self, layers: dict[str, LayerState]) -> None:
        for name, state in layers.items():
            swap_linear(self.model, name, place(packed_layer(state), self.device))

    def pid(self) -> int:
        return os.getpid()


def on_host(value: Any) -> Any:
    """``value`` (a shard's result: statistics, tensors, and containers of them) with its tensors on the host,
    so the driver needs no GPU to receive them."""
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, LayerStats):
        return LayerStats(value.xtx.cpu(), value.count)
    if isinstance(value, dict):
        return {key: on_host(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(on_host(item) for item in value)
    return value


def packed_layer(state: LayerState) -> ModuLoRALinear:
    """The module ``quantize_model`` puts in place of a linear layer (its default ``wrap``)."""
    tensors, manifest, bias = state
    return ModuLoRALinear(weight_from_state(tensors, manifest), bias)


class RayShardRunner(ShardRunner):
    """The calibration shards of ``windows`` on ``workers`` Ray actors (fewer if there are fewer shards)."""

    def __init__(self, model_source: str, windows: torch.Tensor, batch_size: int, asym: bool, shard_windows: int,
                 workers: int, threads: int = 1, device: str = "cpu") -> None:
        import ray

        per_worker = worker_spans(len(windows), shard_windows, workers)
        if len(per_worker) < workers:  # spare workers would only hold a block
            log.warning("%d calibration windows make %d shard(s) of at most %d windows: %d of the %d Ray workers "
                        "hold them; pass at least %d windows to use them all", len(windows), len(per_worker),
                        shard_windows, len(per_worker), workers, workers * shard_windows)
        self._actor = ray.remote(num_cpus=threads, num_gpus=worker_gpus(device, len(per_worker)))(ShardWorker)
        self._spawn_args = [(model_source, ray.put(windows), spans_i, batch_size, asym, threads, device)
                            for spans_i in per_worker]
        self.workers = [self._actor.remote(*args) for args in self._spawn_args]
        self.journal: list[tuple[str, tuple[Any, ...]]] = []  # state-changing calls, replayed by replacements

    def _revive(self, index: int) -> None:
        """Replace dead worker ``index`` and bring it to the state of the others."""
        import ray

        self.workers[index] = worker = self._actor.remote(*self._spawn_args[index])
        for method, args in self.journal:
            ray.get(getattr(worker, method).remote(*args))

    def _gather(self, requests: list[tuple[int, str, tuple[Any, ...]]]) -> list[Any]:
        """Run ``(worker index, method, args)`` requests in parallel; a worker that died meanwhile is
        revived and asked again."""
        import ray

        refs = [getattr(self.workers[i], method).remote(*args) for i, method, args in requests]
        results = []
        for (index, method, args), ref in zip(requests, refs):
            try:
                results.append(ray.get(ref))
            except ray.exceptions.RayActorError:
                self._revive(index)
                results.append(ray.get(getattr(self.workers[index], method).remote(*args)))
        return results

    def _on_all(self, method: str, *args: Any) -> list[Any]:
        return self._gather([(i, method, args) for i in range(len(self.workers))])

    def call(self, method: str, *args: Any) -> list[Any]:
        per_worker = self._on_all("call", method, *args)
        if method in STATEFUL_CALLS:
            self.journal.append(("call", (method, *args)))
        return [result for results in per_worker for result in results]  # shard order

    def quantize(
        self, model: nn.Module, quantizer: Quantizer, names: list[str], stats: dict[str, LayerStats], wrap: Wrap | None,
        install: bool = True,
    ) -> list[str]:
        """Quantize ``names`` on the workers in parallel; with ``install`` (sequential calibration: the next
        group's inputs go through them) the packed layers go to every worker too."""
        import ray

        if wrap is not None:
            raise EngineError("Ray calibration installs plain ModuLoRA layers; a custom wrap runs in one process")
        requests = [(k % len(self.workers), "quantize", (linear_weight(model.get_submodule(n)), stats[n], quantizer))
                    for k, n in enumerate(names)]
        layers = {n: (*packed, model.get_submodule(n).bias) for n, packed in zip(names, self._gather(requests))}
        for name, state in layers.items():
            swap_linear(model, name, packed_layer(state))
        if not install:
            return names
        layers_ref = ray.put(layers)
        self._on_all("install", layers_ref)
        self.journal.append(("install", (layers_ref,)))
        return names


def worker_gpus(device: str, workers: int) -> float:
    """The GPUs each calibration worker asks Ray for: none on the CPU; on ``cuda`` one each, or an even share of
    the cluster's GPUs when there are fewer than workers."""
    if device != "cuda":
        return 0
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    if not gpus:
        raise EngineError("device 'cuda': the Ray cluster has no GPU; use --device cpu")
    return min(1.0, gpus / workers)


def runner_factory(model_source: str, workers: int, threads: int, device: str = "cpu") -> Any:
    """The ``runner_factory`` that ``quantize_calibrated`` calls, with the model's source bound in."""

    def make(model: nn.Module, windows: torch.Tensor, batch_size: int, asym: bool, shard_windows: int) -> RayShardRunner:
        return RayShardRunner(model_source, windows, batch_size, asym, shard_windows, workers, threads, device)

    return make


def on_ray(model_source: str, workers: int, threads: int, address: str | None, device: str = "cpu") -> dict[str, Any]:
    """``quantize``'s arguments that put calibration on Ray workers (computing on ``device``): their runner, and
    the session they need (a local Ray sized for them unless ``address`` names a cluster)."""
    return {"runner_factory": runner_factory(model_source, workers, threads, device),
            "session": lambda: ray_session(address, num_cpus=None if address else workers * threads)}


def _calibrate(workers: int, address: str | None, threads: int, model: str, **given: Any) -> None:
    spec = quantize_spec(model, given)
    if spec.calib is None:
        raise EngineError("modulora calibrate needs calibration data: pass --calib FILE")
    # The driver's own arithmetic (the shard sums, GPTAQ's alignment) with the workers' threads: a product's bits
    # depend on how many threads made it, and the weights must be a one-process run's with that many.  Restored
    # after: the command may run inside a longer-lived process (recipes, tests).
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        manifest = quantize(spec, **on_ray(model, workers, threads, address, resolve_device(spec.device).type))
    finally:
        torch.set_num_threads(previous)
    click.echo(f"{spec.out}: {len(manifest['layers'])} layers, {manifest['size']['bits_per_weight']:.3f} bits/weight, "
               f"{manifest['quantize_seconds']:.1f} s on {workers} Ray worker(s)")


calibrate_command = click.Command(
    "calibrate",
    callback=_calibrate,
    params=[
        click.Argument(["model"]),
        click.Option(["--workers"], type=click.IntRange(min=1), default=2, show_default=True,
                     help="Ray workers holding calibration shards (and parallel quantization tasks)."),
        click.Option(["--address"], default=None,
                     help="Ray cluster address [RAY_ADDRESS, else a local Ray on 127.0.0.1]."),
        click.Option(["--threads"], type=click.IntRange(min=1), default=1, show_default=True,
                     help="Torch threads per worker and task."),
        *as_params(quantize_options),
    ],
    help="Like `modulora quantize --calib`, with calibration shards and layer quantization on Ray workers "
    "(bit-identical to one process with the same threads).",
)
