"""The quantize use case: a float checkpoint (or a quantized GGUF file) into a checksummed quantized directory.

The model is built on ``meta`` and handled one decoder block at a time: the
block's float weights are read from the checkpoint, quantized (calibrated on
the windows' hidden states carried from the block before, for OPTQ and
QuIP#), written to the output's block file and released.  Memory holds one
block's float weights, the input embeddings (calibration only) and the
calibration windows' activations; the rest of the tensors outside the blocks
are read at the end, to be written.  With ``--distill-steps`` the written model's
continuous parameters are then tuned towards the float model (the teacher
streaming its blocks from the checkpoint) and the directory rewritten.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from engine.data import draw_windows, read_text, text_ids
from engine.model import (
    BlockLifecycle,
    CheckpointSource,
    QuantizedWriter,
    RunnerFactory,
    ShardRunner,
    blocks_prefix,
    check_context,
    decoder_blocks,
    linear_share,
    load_block,
    load_gguf_quantized,
    load_outside_blocks,
    load_quantized,
    meta_model,
    open_source,
    place,
    quantize_calibrated,
    quantize_model,
    release_block,
    release_input_embeddings,
    save_quantized,
    target_linear_names,
)
from engine.offload import stream_checkpoint
from engine.options import as_plain
from engine.placement import resolve_device
from engine.pipelines.specs import GGUF_METHOD, QuantizeSpec
from engine.pipelines.locking import holding_outputs
from engine.pipelines.runs import check_replaceable
from engine.storage import sha256_file
from engine.train import distill_continuous


log = logging.getLogger(__name__)
TEACHER_PREFETCH = 1  # teacher blocks read ahead during distillation
MOSTLY_LINEAR = 0.95  # below this share of the block weights in linear layers, say what stays float


@holding_outputs(lambda spec: (spec.out,), lambda spec: (spec.model, spec.calib and spec.calib.file))
def quantize(spec: QuantizeSpec, runner_factory: RunnerFactory = ShardRunner,
             session: Callable[[], AbstractContextManager[Any]] = nullcontext) -> dict[str, Any]:
    """Write ``spec.out``; returns its manifest.  ``runner_factory`` runs the calibration shards elsewhere
    (``modulora calibrate`` passes Ray's; the weights are the same bit for bit), inside ``session`` (the cluster
    it needs), which is entered only once the calibration windows are made: bad sizes are refused first."""
    check_replaceable(spec.out, spec.overwrite)
    if spec.method == GGUF_METHOD:
        model, tokenizer, manifest = load_gguf_quantized(spec.model)
        return save_quantized(model, tokenizer, spec.out, {k: manifest[k] for k in ("source_model", "quantizer")})
    quantizer = spec.quantizer()
    device = _quantize_device(spec, on_workers=runner_factory is not ShardRunner)
    source = open_source(spec.model)
    if spec.calib is not None:
        check_context(source.config, spec.calib.seq_len, "--calib-seq-len")
    model = meta_model(source.config)
    if (share := linear_share(model)) < MOSTLY_LINEAR:
        log.warning("%s: its linear layers hold %.0f%% of each decoder block's weights; the rest (3-D tensors "
                    "the engine does not build as linear layers, such as transposed or biased experts) stays float "
                    "and is not adapted by LoRA", spec.model, 100 * share)
    writer = QuantizedWriter(spec.out, source.config, source.tokenizer())
    info: dict[str, Any] = {"source_model": _source(spec.model), "quantizer": quantizer.describe()}
    start = time.perf_counter()

    def load(index: int) -> None:
        load_block(model, index, source)
        place(decoder_blocks(model)[index], device)

    def done(index: int) -> None:
        writer.write_block(model, index)
        release_block(model, index)

    try:
        if spec.calib is None:
            names, prefix = target_linear_names(model), blocks_prefix(model)
            for index in tqdm(range(len(decoder_blocks(model))), desc=f"quantize ({quantizer.name})", unit="block",
                              leave=False):
                load(index)
                quantize_model(model, quantizer, [n for n in names if n.startswith(f"{prefix}.{index}.")])
                done(index)
        else:
            c = spec.calib
            load_outside_blocks(model, source, head=False)  # the calibration windows start at the embeddings
            place(model, device)
            ids = text_ids(source.tokenizer(), read_text(c.file))
            windows = draw_windows(ids, c.windows, c.seq_len, c.seed)
            distill_windows = windows if c.distill_windows is None else draw_windows(
                ids, c.distill_windows, c.seq_len, c.seed + 1)  # drawn (or refused) up front
            with session():
                quantize_calibrated(model, quantizer, windows, mode=c.mode, asym_alpha=c.asym,
                                    shard_windows=c.shard_windows, runner_factory=runner_factory,
                                    lifecycle=BlockLifecycle(load, done, lambda: release_input_embeddings(model)))
            info["calibration"] = {**as_plain(c), "file": str(Path(c.file).resolve()), "sha256": sha256_file(c.file),
                                   "asym_alpha": c.asym}
        info["quantize_seconds"] = time.perf_counter() - start
        load_outside_blocks(model, source)
    except BaseException:
        writer.abort()
        raise
    manifest = writer.finish(model, info)
    if spec.calib is not None and spec.calib.distill_steps:
        manifest = _distill(spec, source, distill_windows, device, info)
    return manifest


def _distill(spec: QuantizeSpec, source: CheckpointSource, windows: torch.Tensor, device: torch.device,
             info: dict[str, Any]) -> dict[str, Any]:
    """Tune the written model's continuous parameters towards the float model (:mod:`engine.train.distill`) and
    write it again in place.  The rounded model stays in ``spec.out`` until the tuned one replaces it whole.

    The student is the packed model, resident; the teacher streams its decoder blocks from the checkpoint."""
    c = spec.calib
    start = time.perf_counter()
    student, tokenizer, _ = load_quantized(spec.out)
    place(student, device)
    teacher, streamer = stream_checkpoint(source, TEACHER_PREFETCH, device)
    try:
        result = distill_continuous(student, teacher, windows, steps=c.distill_steps, lr=c.distill_lr,
                                    batch_size=c.distill_batch, seed=c.seed)
    finally:
        streamer.close()
    info["distillation"] = {"steps": c.distill_steps, "lr": c.distill_lr, "batch": c.distill_batch,
                            "windows": len(windows),
                            "first_kl": result.first_loss, "last_kl": result.last_loss,
                            "layers_with_row_gains": result.gained_layers, "seconds": time.perf_counter() - start}
    info["quantize_seconds"] += info["distillation"]["seconds"]
    return save_quantized(student, tokenizer, spec.out, info)


def _quantize_device(spec: QuantizeSpec, on_workers: bool) -> torch.device:
    """Where the driver quantizes the blocks: the command's device (the calibration's forward passes, statistics
    and solves included), or the CPU when calibration shards run on Ray workers (``modulora calibrate``), which
    compute on the command's device themselves and hand back host tensors."""
    return torch.device("cpu") if on_workers and spec.calib is not None else resolve_device(spec.device)


def _source(model: str) -> str:
    """A local model as its absolute path (a hub id as it is), so the record holds from any folder."""
    return str(Path(model).resolve()) if Path(model).exists() else model
