"""Calibration on Ray: the engine's calibration shards on Ray workers, layers quantized in parallel.

The use case is the engine's own (:func:`engine.pipelines.quantize`, whose driver loop is
:func:`engine.model.quantize_calibrated`); this module only supplies its
:class:`~engine.model.ShardRunner` on Ray:

* each worker (an actor) builds the model on ``meta`` with its input embeddings
  (released once its windows are embedded), reads each decoder block from the checkpoint when the driver starts it and
  releases it after (never a whole float model), and holds a contiguous run of
  the calibration shards; the windows go through Ray's object store once;
* a group's statistics stay on the workers: each worker sums its own shards,
  and the sum travels from worker to worker in shard order (``(s0 + s1) + s2``,
  exactly as one process adds them, so the weights are bit-identical);
* the worker a layer falls to aligns it (GPTAQ) and quantizes it, so the
  layers of a group are quantized in parallel and only packed layers reach the
  driver, which sends a group's to every other worker;
* everything large (sums, packed layers) travels in pieces small enough to
  ride inside Ray's messages (:mod:`cluster.pieces`): the object store would
  keep its shared-memory pages in the RSS of every worker that touched them;
* a worker that dies is replaced: the new one replays the calls that changed
  its state (blocks begun and ended, layers installed), and the group at work
  starts over.  The installed layers wait for a replay in a scratch file per
  group under ``TMPDIR`` (the packed model's size by the end, removed with the
  run);
* with ``--device cuda`` each worker asks Ray for a GPU (or a share of one) and
  computes there, handing back host tensors.

    modulora calibrate MODEL --method optq --bits 3 --calib train.txt --workers 2 --out q3
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from engine.errors import EngineError
from engine.lora import ModuLoRALinear
from engine.model import (
    CalibrationShard, ShardRunner, Wrap, aligned_weight, decoder_blocks, linear_weight, load_block, load_outside_blocks,
    meta_model, open_source, place, quantized_weight, release_block, release_input_embeddings, swap_linear,
    worker_spans,
)
from engine.placement import resolve_device
from engine.procstat import keep_heap_bounded
from engine.pipelines import as_params, quantize, quantize_options, quantize_spec
from engine.quant import LayerStats, Quantizer, weight_from_state

from cluster.pieces import (
    TensorSpec, as_bytes, empty_like_spec, fill, joined, one_return_each, pieces_of, relay, sent_pieces, spec_of,
)
from cluster.runtime import ray_session

log = logging.getLogger(__name__)
STATEFUL_CALLS = ("capture_inputs", "begin_block", "end_block")  # what a replacement worker replays (and installs)
RETRIES = 3  # times a group starts over after a worker died

LayerState = tuple[dict[str, torch.Tensor], dict[str, Any], torch.Tensor | None]  # tensors, manifest, bias


class ShardWorker:
    """A Ray actor: the model's embeddings, the block at work and a run of calibration shards, kept in step with
    the driver.  It computes on ``device`` (the GPU Ray gave it, for ``cuda``) and hands back host tensors.

    A group's statistics stay here: :meth:`collect` makes each shard's and keeps them; the chain of
    :class:`RayShardRunner` adds them up worker after worker (:meth:`send` to :meth:`receive`) and the worker a
    layer falls to aligns and quantizes it (:meth:`quantize`), so only packed layers go back to the driver
    (:meth:`send_packed`), which hands them to the other workers (:meth:`open_packed`, :meth:`fill_packed`) and
    has every worker :meth:`install` them."""

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
        self.terms: dict[tuple[str, str], list[torch.Tensor]] = {}  # (layer, field): this worker's shards' sums
        self.packed: dict[str, dict[str, torch.Tensor]] = {}  # layer: packed tensors quantized here or received

    def call(self, method: str, *args: Any) -> list[Any]:
        """``method`` on every shard; a block is read from the checkpoint before its ``begin_block`` and
        released after its ``end_block``."""
        if method == "begin_block":
            load_block(self.model, args[0], self.source)
            place(decoder_blocks(self.model)[args[0]], self.device)
        results = [getattr(shard, method)(*args) for shard in self.shards]
        if method == "capture_inputs":  # every window embedded: the table is not needed again
            release_input_embeddings(self.model)
            gc.collect()
        if method == "end_block":
            release_block(self.model, args[0])
            gc.collect()  # see install
        return results

    def collect(self, method: str, index: int, names: list[str]) -> dict[str, tuple[int, dict[str, tuple]]]:
        """Make and keep the shards' statistics ``method`` of ``names``; per layer, the rows this worker saw and
        the shape and element size of each sum it holds (``xtx``, and ``cross`` with GPTAQ)."""
        parts = [getattr(shard, method)(index, names) for shard in self.shards]
        self.terms = {}
        summary = {}
        for name in names:
            seen = [(stats[name], cross.get(name)) for stats, cross in parts if stats[name].count]
            self.terms[name, "xtx"] = [s.xtx for s, _ in seen]
            if seen and seen[0][1] is not None:
                self.terms[name, "cross"] = [c for _, c in seen]
            summary[name] = (sum(s.count for s, _ in seen),
                             {field: (tuple(terms[0].shape), terms[0].element_size()) for field in FIELDS
                              if (terms := self.terms.get((name, field)))})
        return summary

    def send(self, name: str, field: str, start: int, pieces: int) -> np.ndarray | tuple[np.ndarray, ...]:
        """``pieces`` pieces of this worker's sum of ``(name, field)``, flat from element ``start``."""
        return one_return_each(pieces_of(self._settled(name, field).view(-1), start, pieces))

    def receive(self, name: str, field: str, shape: tuple[int, ...], whole: bool, start: int,
                *pieces: np.ndarray) -> None:
        """Add the sum of the workers before this one, in pieces from element ``start``, before this worker's
        own shards' sums (a left fold in shard order: ``(prefix + a) + b``); a ``whole`` sum, forwarded to the
        worker that quantizes the layer, is kept as it comes."""
        prefix = joined(pieces, self.device)
        terms = self.terms.setdefault((name, field), [])
        if whole and start == 0:
            terms.append(torch.empty(shape, dtype=prefix.dtype, device=self.device))
        stop = start + prefix.numel()
        target = terms[0].view(-1)[start:stop]
        target.copy_(prefix) if whole else target.add_(prefix)  # a + p has the bits of p + a
        for term in terms[1:]:
            target.add_(term.view(-1)[start:stop])
        if stop == terms[0].numel():  # the last piece: the other shards' sums are in
            del terms[1:]

    def _settled(self, name: str, field: str, pop: bool = False) -> torch.Tensor:
        """This worker's sum of ``(name, field)``: its shards' sums added in order, once; with ``pop`` the
        worker lets go of it (the caller's reference is then the only one).  Not one process's ``fold_into`` of
        whole statistics: a worker after the first adds the sum it receives first, piece by piece (:meth:`receive`),
        so its shards' terms stay apart until then."""
        terms = self.terms.pop((name, field)) if pop else self.terms[name, field]
        for term in terms[1:]:
            terms[0].add_(term)
        del terms[1:]
        return terms[0]

    def drop(self, name: str) -> None:
        for field in FIELDS:
            self.terms.pop((name, field), None)

    def quantize(self, counts: dict[str, int], quantizer: Quantizer,
                 asym_alpha: float) -> dict[str, tuple[dict[str, TensorSpec], dict]]:
        """Quantize each layer in ``counts`` (its total rows) from the summed statistics this worker holds:
        aligned first when there are cross statistics (GPTAQ), as one process does
        (:func:`engine.model.calibrate_group`).  The packed tensors stay here for :meth:`send_packed` and
        :meth:`install`; per layer, their dtypes and shapes and the manifest go back.  The worker's own model keeps
        its float layers until the driver installs the group."""
        packed = {}
        for name, count in counts.items():
            linear = self.model.get_submodule(name)
            stats = LayerStats(self._settled(name, "xtx", pop=True) if count else torch.empty(0), count,
                               disposable=True)
            weight = None
            if asym_alpha and (name, "cross") in self.terms:  # given up to the alignment, which overwrites it
                weight = aligned_weight(linear_weight(linear), stats, self._settled(name, "cross", pop=True),
                                        asym_alpha)
            qweight = quantized_weight(name, linear, quantizer, stats, weight)
            del stats, weight
            self.packed[name] = {key: t.cpu() for key, t in qweight.state_dict().items()}
            packed[name] = ({key: spec_of(t) for key, t in self.packed[name].items()}, qweight.manifest())
        return packed

    def send_packed(self, name: str, key: str, start: int, pieces: int) -> np.ndarray | tuple[np.ndarray, ...]:
        """``pieces`` pieces of the bytes of packed tensor ``key`` of ``name``, from byte ``start``."""
        return one_return_each(pieces_of(as_bytes(self.packed[name][key]), start, pieces))

    def open_packed(self, specs: dict[str, dict[str, TensorSpec]]) -> None:
        """Make room for packed layers quantized elsewhere (``specs``: per layer, its tensors' dtypes and
        shapes), filled by :meth:`fill_packed`."""
        for name, tensors in specs.items():
            self.packed[name] = {key: empty_like_spec(spec) for key, spec in tensors.items()}

    def fill_packed(self, name: str, key: str, start: int, *pieces: np.ndarray) -> None:
        fill(as_bytes(self.packed[name][key]), start, pieces)

    def drop_packed(self) -> None:
        self.packed.clear()

    def install(self, manifests: dict[str, dict]) -> None:
        """Put the packed layers this worker holds in place of the float ones (each keeps its bias)."""
        for name, manifest in manifests.items():
            bias = self.model.get_submodule(name).bias
            swap_linear(self.model, name, place(packed_layer((self.packed.pop(name), manifest, bias)), self.device))
        # Ray's deserialized arguments can be left in reference cycles that only a full collection frees (with the
        # layers sent through the object store, a 4-block hidden-1024 run held 2-10 MB more after each group).
        gc.collect()

    def pid(self) -> int:
        return os.getpid()


FIELDS = ("xtx", "cross")  # a layer's sums: X_q^T X_q, and X_q^T X with GPTAQ


def layer_owners(names: list[str], workers: int) -> dict[str, int]:
    """The worker each layer of a group falls to, counting back from the last (where the chain of sums ends)."""
    return {name: (workers - 1 - j) % workers for j, name in enumerate(names)}


def packed_layer(state: LayerState) -> ModuLoRALinear:
    """The module ``quantize_model`` puts in place of a linear layer (its default ``wrap``)."""
    tensors, manifest, bias = state
    return ModuLoRALinear(weight_from_state(tensors, manifest), bias)


class RayShardRunner(ShardRunner):
    """The calibration shards of ``windows`` on ``workers`` Ray actors (fewer if there are fewer shards).

    A group's statistics never leave the workers whole: each worker sums its own shards, the sum travels
    worker to worker in shard order, in pieces small enough to ride in Ray's messages (the object store would
    keep every piece's pages in both processes' RSS), and the worker a layer falls to quantizes it.  The sums
    are the one process's, bit for bit (:meth:`ShardRunner.stats`).
    """

    def __init__(self, model_source: str, windows: torch.Tensor, batch_size: int, asym: bool, shard_windows: int,
                 workers: int, threads: int = 1, device: str = "cpu") -> None:
        import ray

        per_worker = worker_spans(len(windows), shard_windows, workers)
        if len(per_worker) < workers:  # spare workers would only hold a block
            log.warning("%d calibration windows make %d shard(s) of at most %d windows: %d of the %d Ray workers "
                        "hold them; pass at least %d windows (or --shard-windows %d) to use them all", len(windows),
                        len(per_worker), shard_windows, len(per_worker), workers, workers * shard_windows,
                        max(1, len(windows) // workers))
        self._actor = ray.remote(num_cpus=threads, num_gpus=worker_gpus(device, len(per_worker)))(ShardWorker)
        self._spawn_args = [(model_source, ray.put(windows), spans_i, batch_size, asym, threads, device)
                            for spans_i in per_worker]
        self.workers = [self._actor.remote(*args) for args in self._spawn_args]
        # State-changing calls, replayed by replacements; an install's layers are in a file of `scratch`.
        self.journal: list[tuple[str, tuple[Any, ...]]] = []
        self.scratch = tempfile.TemporaryDirectory(prefix="modulora-calibrate-")

    def _revive(self, index: int) -> None:
        """Replace dead worker ``index`` and bring it to the state of the others."""
        import ray

        self.workers[index] = worker = self._actor.remote(*self._spawn_args[index])
        for method, args in self.journal:
            if method == "install":
                layers = read_layers(*args)
                self._install(index, layers, sent=list(layers))
            else:
                ray.get(getattr(worker, method).remote(*args))

    def _heal(self) -> bool:
        """Revive every worker that died; whether there was one."""
        import ray

        dead = []
        for index, worker in enumerate(self.workers):
            try:
                ray.get(worker.pid.remote())
            except ray.exceptions.RayActorError:
                dead.append(index)
        for index in dead:
            self._revive(index)
        return bool(dead)

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

    def calibrate(
        self, model: nn.Module, quantizer: Quantizer, index: int, names: list[str], method: str, asym_alpha: float,
        wrap: Wrap | None,
    ) -> list[str]:
        """Quantize ``names`` of block ``index`` on the workers and put the packed layers in the driver's
        ``model``; sequential calibration (``group_stats``) installs them on every worker too, since the next
        group's inputs go through them.  A worker that dies meanwhile is replaced and the group starts over."""
        import ray

        if wrap is not None:
            raise EngineError("Ray calibration installs plain ModuLoRA layers; a custom wrap runs in one process")
        for attempt in range(RETRIES + 1):
            try:
                packed = self._calibrate_on_workers(quantizer, index, names, method, asym_alpha)
                break
            except ray.exceptions.RayError:
                if attempt == RETRIES or not self._heal():
                    raise
        layers = {n: (*packed[n], model.get_submodule(n).bias) for n in names}
        for name, state in layers.items():
            swap_linear(model, name, packed_layer(state))
        if method != "group_stats":  # the next group's inputs do not go through them: the workers let them go
            self._on_all("drop_packed")
            return names
        owner = layer_owners(names, len(self.workers))
        for w in range(len(self.workers)):
            try:
                self._install(w, layers, sent=[n for n in names if owner[n] != w])
            except ray.exceptions.RayActorError:
                self._revive(w)
                self._install(w, layers, sent=names)
        path = Path(self.scratch.name) / f"install-{len(self.journal):06d}.safetensors"
        write_layers(path, layers)
        self.journal.append(("install", (path,)))
        return names

    def _install(self, index: int, layers: dict[str, LayerState], sent: list[str]) -> None:
        """Have worker ``index`` put ``layers`` in place, after sending it the packed tensors of those in
        ``sent`` (it holds the others: it quantized them), in pieces."""
        import ray

        worker = self.workers[index]
        ray.get(worker.open_packed.remote({n: {k: spec_of(t) for k, t in layers[n][0].items()} for n in sent}))
        for name in sent:
            for key, tensor in layers[name][0].items():
                source = as_bytes(tensor)
                relay(source.numel(), 1, lambda start, count: pieces_of(source, start, count),
                      lambda start, pieces: worker.fill_packed.remote(name, key, start, *pieces))
        ray.get(worker.install.remote({n: manifest for n, (_, manifest, _) in layers.items()}))

    def _pull(self, index: int, name: str, specs: dict[str, TensorSpec]) -> dict[str, torch.Tensor]:
        """The packed tensors of layer ``name`` that worker ``index`` quantized, fetched in pieces."""
        import ray

        tensors = {key: empty_like_spec(spec) for key, spec in specs.items()}
        for key, tensor in tensors.items():
            target = as_bytes(tensor)
            relay(target.numel(), 1,
                  lambda start, count: sent_pieces(self.workers[index].send_packed, count, name, key, start),
                  lambda start, refs: fill(target, start, tuple(ray.get(refs))))
        return tensors

    def _calibrate_on_workers(self, quantizer: Quantizer, index: int, names: list[str], method: str,
                              asym_alpha: float) -> dict[str, tuple[dict, dict]]:
        """Each layer's packed tensors and manifest: its statistics made on every worker, summed along the chain
        of the workers that saw rows (in shard order), handed to the worker the layer falls to and used there."""
        import ray

        summaries = ray.get([w.collect.remote(method, index, names) for w in self.workers])
        owner = layer_owners(names, len(self.workers))
        for name in names:
            chain = [w for w, summary in enumerate(summaries) if summary[name][0]]  # the workers that saw rows
            holder = chain[0] if chain else owner[name]
            handover = [(owner[name], True)] if chain and owner[name] != chain[-1] else []
            for after, whole in [*((w, False) for w in chain[1:]), *handover]:
                for field, (shape, element_size) in summaries[holder][name][1].items():
                    self._pass_on(holder, after, name, field, shape, element_size, whole)
                ray.get(self.workers[holder].drop.remote(name))
                holder = after
        counts = {name: sum(summary[name][0] for summary in summaries) for name in names}
        per_worker = [{n: counts[n] for n in names if owner[n] == w} for w in range(len(self.workers))]
        quantized = {w: self.workers[w].quantize.remote(mine, quantizer, asym_alpha)
                     for w, mine in enumerate(per_worker) if mine}
        return {name: (self._pull(w, name, specs), manifest)
                for w, ref in quantized.items() for name, (specs, manifest) in ray.get(ref).items()}

    def _pass_on(self, sender: int, receiver: int, name: str, field: str, shape: tuple[int, ...],
                 element_size: int, whole: bool) -> None:
        """Add worker ``sender``'s sum of ``(name, field)`` into ``receiver``'s, piece by piece (``whole``: the
        total, handed to a receiver that holds none of it)."""
        relay(math.prod(shape), element_size,
              lambda start, count: sent_pieces(self.workers[sender].send, count, name, field, start),
              lambda start, refs: self.workers[receiver].receive.remote(name, field, shape, whole, start, *refs))


def write_layers(path: Path, layers: dict[str, LayerState]) -> None:
    """``layers`` in a safetensors file: tensors as ``layer/key``, biases as ``layer#bias``, manifests in its
    metadata."""
    tensors = {f"{name}/{key}": t for name, (state, _, _) in layers.items() for key, t in state.items()}
    tensors |= {f"{name}#bias": bias for name, (_, _, bias) in layers.items() if bias is not None}
    save_file({k: t.detach().contiguous() for k, t in tensors.items()}, path,
              metadata={"manifests": json.dumps({name: manifest for name, (_, manifest, _) in layers.items()})})


def read_layers(path: Path) -> dict[str, LayerState]:
    """The layers :func:`write_layers` wrote."""
    with safe_open(path, "pt") as f:
        manifests = json.loads(f.metadata()["manifests"])
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    return {name: ({key.partition("/")[2]: t for key, t in tensors.items() if key.startswith(f"{name}/")},
                   manifest, tensors.get(f"{name}#bias")) for name, manifest in manifests.items()}


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
    manifest = quantize(spec, **on_ray(model, workers, threads, address, resolve_device(spec.device).type))
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
