"""The correct use case (LREC): LoRA on every decoder linear of a quantized model, trained to match its float
teacher.  ``OUT`` is itself a corrected model: a quantized directory (its base re-quantized by the LoftQ
initialisation) with ``adapter/`` inside, and the training run in ``OUT/train``.

Nothing holds a whole model: the initialisation goes one decoder block at a time (the teacher's block read from
its checkpoint, the student's re-quantized and written), and in training the teacher's blocks are read from its
checkpoint as they compute (its vocabulary tables in place, for a safetensors checkpoint) while the student's
stream from ``OUT`` on the disk tier; the KL and cross-entropy run over tiles of the vocabulary.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from engine.data import FormatSpec, build_examples, calibration_windows, check_data, read_text
from engine.errors import EngineError
from engine.export import save_adapter
from engine.model import (
    SHARD_WINDOWS, CheckpointSource, ShardRunner, QuantizedWriter, add_lora, blocks_prefix, check_context, decoder_blocks, is_quantized_dir,
    load_block, load_block_weights, load_outside_blocks, load_quantized, lora_layers, meta_model, model_size,
    open_source, read_manifest, release_block, release_block_weights,
)
from engine.offload import stream_checkpoint
from engine.options import as_plain
from engine.pipelines.loading import ADAPTER_DIR, ADAPTER_INIT_DEVICE, attach_offload, load_with_adapter, pad_id
from engine.pipelines.loading import streams_in_place
from engine.pipelines.launching import run_training
from engine.pipelines.specs import CorrectSpec
from engine.placement import resolve_device
from engine.quant import Quantizer, make_quantizer
from engine.pipelines.locking import holding_outputs
from engine.pipelines.runs import RUN_SPEC, check_run_folder, record_run
from engine.storage import SEAL, atomic_write_json
from engine.train import Trainer, WorkerGroup, distillation_loss, loftq_init

REPORT = "report.json"
MANIFEST_ONLY = ("layers", "aliases", "size", "files", "format_version", SEAL)  # what the writer writes anew
STATS_BATCH = 8  # calibration windows per forward pass when LoftQ needs the teacher's input statistics


@holding_outputs(lambda spec: (spec.out, spec.offload.dir), lambda spec: (spec.model, spec.teacher, spec.calib))
def correct(spec: CorrectSpec) -> dict[str, Any]:
    """Write the corrected model to ``spec.out``; returns the training report."""
    out = Path(spec.out)
    check_data(spec.calib, FormatSpec("text"))
    if not is_quantized_dir(spec.model):
        raise EngineError(f"{spec.model}: not a quantized model directory (correct needs one)")
    manifest = read_manifest(spec.model)
    teacher_path = spec.teacher or manifest.get("source_model")
    if not teacher_path:
        raise EngineError(f"{spec.model}: no source_model in its manifest; pass the teacher model")
    source = open_source(teacher_path)
    check_context(source.config, spec.seq_len, "--seq-len")
    correction = {"teacher": str(teacher_path), "calib": spec.calib, "rank": spec.rank, "init": spec.init,
                  "ce_weight": spec.ce_weight}
    check_run_folder(spec, out, out / "train" / RUN_SPEC)
    if not (spec.resume and is_quantized_dir(out)):
        initialise(spec, manifest, source, {**correction})
    record_run(spec, out / "train" / RUN_SPEC)
    run_training(functools.partial(train_worker, spec, str(teacher_path), correction), spec.parallel, spec.device,
                 out / "train", spec.train.keep_last)
    return json.loads((out / "train" / REPORT).read_text())


def train_worker(spec: CorrectSpec, teacher_path: str, correction: dict[str, Any], group: WorkerGroup) -> None:
    """The correction's training on one worker of ``group`` (the only one, in one process): the student streams
    from ``OUT``, the teacher from its checkpoint; worker 0 writes the adapter and the report."""
    out = Path(spec.out)
    device = resolve_device(spec.device)
    source = open_source(teacher_path)
    student, tokenizer, _ = load_with_adapter(out, stream=streams_in_place(out, spec.offload))
    teacher, teacher_streamer = stream_checkpoint(source, spec.offload.prefetch, device)
    streamer = attach_offload(student, out, spec.offload, out / "blocks", device, group)
    examples = build_examples(spec.calib, FormatSpec("text"), tokenizer, spec.seq_len, spec.limit)
    start = time.perf_counter()
    trainer = Trainer(student, examples, spec.train, out / "train", pad_id(tokenizer), host_optimizer=spec.offload.optimizer,
                      loss_fn=distillation_loss(teacher, spec.ce_weight), device=device, group=group)
    try:
        metrics = trainer.train(resume=spec.resume)
    finally:
        for running in (streamer, teacher_streamer):
            if running is not None:
                running.close()
    seconds = time.perf_counter() - start
    if group.rank != 0:
        return
    save_adapter(student, out / ADAPTER_DIR, str(out.resolve()))
    report = {"spec": as_plain(spec), "final": metrics, "train_seconds": seconds, "size": model_size(student),
              "workers": group.size, "resumed_from_step": trainer.start_step, **correction}
    atomic_write_json(out / "train" / REPORT, report)


def initialise(spec: CorrectSpec, manifest: dict[str, Any], source: CheckpointSource, correction: dict[str, Any]) -> None:
    """``OUT``: the student's blocks (re-quantized with LoftQ from the teacher's, one block at a time; kept as they
    are, the adapter fitted to their error, when the directory was distilled), its outside tensors as they are, and
    the initial adapter."""
    out, lora = Path(spec.out), spec.lora
    stream = manifest["format_version"] == 2
    student, tokenizer, _ = load_quantized(spec.model, stream=stream)
    add_lora(student, lora.adapter_rank, lora.scale_alpha, seed=spec.train.seed, device=ADAPTER_INIT_DEVICE)
    fit = spec.init == "loftq"
    requantize = fit and "distillation" not in manifest  # a distilled base keeps its tuned scales: SVD start only
    quantizer = _requantizer(manifest) if requantize else None
    teacher = meta_model(source.config)
    runner = (_teacher_statistics(teacher, source, tokenizer, spec.calib, manifest)
              if requantize and quantizer.needs_calibration else None)
    names, prefix = list(lora_layers(student)), blocks_prefix(student)
    writer = QuantizedWriter(out, student.config, tokenizer)
    try:
        for index in range(len(decoder_blocks(student))):
            block_names = [n for n in names if n.startswith(f"{prefix}.{index}.")]
            if stream and not requantize:
                load_block_weights(student, spec.model, index)
            if fit:
                load_block(teacher, index, source)
                stats = runner.stats("block_stats", index, block_names)[0] if runner is not None else None
                loftq_init(student, teacher, quantizer, spec.loftq_iters, stats, names=block_names)
                if runner is not None:
                    runner.call("end_block", index)
                release_block(teacher, index)
            writer.write_block(student, index)
            if stream:
                release_block_weights(student, index)
        info = {k: v for k, v in manifest.items() if k not in MANIFEST_ONLY}
        writer.finish(student, {**info, "correction": correction}, outside_of=Path(spec.model) if stream else None)
    except BaseException:
        writer.abort()
        raise
    save_adapter(student, out / ADAPTER_DIR, str(out.resolve()))


def _requantizer(manifest: dict[str, Any]) -> Quantizer:
    """The quantizer a directory was made with, to re-quantize ``W - s B A`` during LoftQ."""
    settings = {k: v for k, v in manifest["quantizer"].items() if k != "method"}
    return make_quantizer(manifest["quantizer"]["method"], **settings)


def _teacher_statistics(teacher: Any, source: CheckpointSource, tokenizer: PreTrainedTokenizerBase, calib: str,
                        manifest: dict[str, Any]) -> ShardRunner:
    """For LoftQ with a calibrated quantizer (OPTQ, QuIP#): the float teacher's layer inputs, block by block, on
    windows of the correction text, as many and as long as the directory was calibrated with.  Each layer is
    re-quantized on its own from the teacher's weight, so the teacher's inputs are the right ones (the
    "independent" calibration mode)."""
    recorded = manifest["calibration"]
    windows = calibration_windows(tokenizer, read_text(calib), recorded["windows"], recorded["seq_len"],
                                  recorded["seed"])
    load_outside_blocks(teacher, source)
    return ShardRunner(teacher, windows, STATS_BATCH, False, recorded.get("shard_windows", SHARD_WINDOWS))
