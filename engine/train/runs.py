"""Whole runs behind ``modulora finetune`` and ``modulora correct`` (and the recipe stages).

Output layout of a run directory::

    adapter/              PEFT-format adapter (engine.export.peft_format)
    checkpoints/step-N/   resumable training state
    metrics.jsonl, tensorboard/, report.json

``correct`` additionally writes a full quantized model directory (its base may
have been re-quantized by the LoftQ initialisation), so ``OUT`` is itself a
"corrected model": a quantized directory with an ``adapter/`` inside.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from engine.data import FormatSpec, build_examples, check_data
from engine.errors import EngineError
from engine.eval.perplexity import perplexity, read_text, token_windows
from engine.export.merge import save_merged
from engine.export.peft_format import attach_adapter, is_adapter_dir, read_adapter, save_adapter
from engine.model import is_quantized_dir, load_float_model, load_model, model_size, save_quantized
from engine.model.calibrate import calibration_windows
from engine.model.stats import collect_stats
from engine.offload import BlockStreamer, make_store, offload_vocab_tables
from engine.quant import make_quantizer
from engine.quant.base import LayerStats, Quantizer
from engine.storage import atomic_write_json
from engine.train.adapters import add_lora, lora_layers, set_active_rank
from engine.train.lrec import distillation_loss, loftq_init
from engine.train.trainer import EvalFn, TrainConfig, Trainer

ADAPTER_DIR = "adapter"
COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load_with_adapter(source: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict[str, Any] | None]:
    """A model with the adapter of a corrected directory or of a finetune run.

    A corrected directory is a quantized model with ``adapter/`` inside; a
    finetune run holds only ``adapter/``, whose config names the base model.
    """
    adapter = Path(source) / ADAPTER_DIR
    if not is_adapter_dir(adapter):
        return load_model(source)
    base = source if is_quantized_dir(source) else read_adapter(adapter)[0]["base_model_name_or_path"]
    model, tokenizer, manifest = load_model(base)
    attach_adapter(model, adapter)
    return model, tokenizer, manifest


def compute_dtype(name: str) -> torch.dtype:
    if name not in COMPUTE_DTYPES:
        raise EngineError(f"unknown compute dtype {name!r}; allowed: {', '.join(COMPUTE_DTYPES)}")
    return COMPUTE_DTYPES[name]


def _prepare_adapters(model: PreTrainedModel, rank: int, alpha: float | None, seed: int, dtype: torch.dtype) -> None:
    """Fresh adapters, unless the model (a corrected one) already carries one: then training goes on from it."""
    if not lora_layers(model):
        add_lora(model, rank, alpha, seed=seed)
    for layer in lora_layers(model).values():
        layer.compute_dtype = dtype


def perplexity_eval(tokenizer: PreTrainedTokenizerBase, path: str | Path, seq_len: int, limit: int | None) -> EvalFn:
    windows = token_windows(tokenizer, read_text(path), seq_len)[:limit]
    return lambda model: {"ppl": perplexity(model, windows, progress=False).ppl}


def finetune(
    model_source: str,
    data: str,
    spec: FormatSpec,
    out_dir: str | Path,
    config: TrainConfig,
    *,
    rank: int = 8,
    alpha: float | None = None,
    seq_len: int = 256,
    limit: int | None = None,
    dtype: str = "float32",
    eval_data: str | None = None,
    eval_limit: int | None = 64,
    resume: bool = False,
    offload: str | None = None,
    offload_dir: str | Path | None = None,
    prefetch: int = 1,
) -> dict[str, Any]:
    """LoRA on a float model, ModuLoRA on a quantized one, or more training of a corrected one.

    With ``offload`` the decoder blocks' packed weights live on that tier
    (``device``, ``host`` or ``disk`` under ``offload_dir``) and are streamed in
    block by block; the updates are the same bit for bit.
    """
    out_dir = Path(out_dir)
    check_data(data, spec)
    model, tokenizer, _ = load_with_adapter(model_source)
    _prepare_adapters(model, config.rank_max or rank, alpha, config.seed, compute_dtype(dtype))
    examples = build_examples(data, spec, tokenizer, seq_len, limit)
    eval_fn = perplexity_eval(tokenizer, eval_data, seq_len, eval_limit) if eval_data else None
    size = model_size(model)  # before offloading: the same figures as a resident run
    streamer = None
    if offload is not None:
        store = make_store(offload, directory=offload_dir or out_dir / "blocks")
        streamer = BlockStreamer(model, store, prefetch)
        if offload == "disk":
            offload_vocab_tables(model, store.directory)
    start = time.perf_counter()
    try:
        metrics = Trainer(model, examples, config, out_dir, _pad_id(tokenizer), eval_fn=eval_fn).train(resume=resume)
    finally:
        if streamer is not None:
            streamer.close()
    seconds = time.perf_counter() - start
    save_adapter(model, out_dir / ADAPTER_DIR, str(model_source))
    report = {
        "model": str(model_source),
        "data": data,
        "format": spec.name,
        "examples": len(examples),
        "train": asdict(config),
        "final": metrics,
        "train_seconds": seconds,
        "size": size,
    }
    if streamer is not None:
        report["offload"] = {"tier": offload, "prefetch": prefetch, "bytes_fetched": streamer.store.bytes_fetched,
                             "max_blocks_resident": streamer.max_resident}
    atomic_write_json(out_dir / "report.json", report)
    return report


def correct(
    quantized_dir: str,
    calib: str,
    out_dir: str | Path,
    config: TrainConfig,
    *,
    teacher: str | None = None,
    rank: int = 8,
    alpha: float | None = None,
    init: str = "loftq",
    loftq_iters: int = 4,
    ce_weight: float = 1.0,
    seq_len: int = 256,
    limit: int | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """LREC: train LoRA on every decoder linear of a quantized model to match its float teacher."""
    if init not in ("loftq", "zero"):
        raise EngineError(f"unknown --init {init!r}; allowed: loftq, zero")
    out_dir = Path(out_dir)
    check_data(calib, FormatSpec("text"))
    if not is_quantized_dir(quantized_dir):
        raise EngineError(f"{quantized_dir}: not a quantized model directory (correct needs one)")
    student, tokenizer, manifest = load_model(quantized_dir)
    teacher_source = teacher or manifest.get("source_model")
    if not teacher_source:
        raise EngineError(f"{quantized_dir}: no source_model in its manifest; pass --teacher MODEL")
    teacher_model, _ = load_float_model(teacher_source)
    correction = {"teacher": str(teacher_source), "calib": calib, "rank": rank, "init": init, "ce_weight": ce_weight}
    if resume and (out_dir / "modulora.json").is_file():
        student, tokenizer, _ = load_model(out_dir)  # the base as initialised (LoftQ) before the interruption
        add_lora(student, rank, alpha, seed=config.seed)
    else:
        add_lora(student, rank, alpha, seed=config.seed)
        if init == "loftq":
            quantizer = _requantizer(manifest)
            stats = _loftq_stats(teacher_model, tokenizer, calib, manifest) if quantizer.needs_calibration else None
            loftq_init(student, teacher_model, quantizer, loftq_iters, stats)
        info = {k: v for k, v in manifest.items() if k not in ("layers", "aliases", "size", "files", "format_version")}
        save_quantized(student, tokenizer, out_dir, {**info, "correction": correction})
    examples = build_examples(calib, FormatSpec("text"), tokenizer, seq_len, limit)
    start = time.perf_counter()
    loss = distillation_loss(teacher_model, ce_weight)
    metrics = Trainer(student, examples, config, out_dir / "train", _pad_id(tokenizer), loss_fn=loss).train(resume=resume)
    seconds = time.perf_counter() - start
    save_adapter(student, out_dir / ADAPTER_DIR, str(out_dir.resolve()))
    report = {"final": metrics, "train_seconds": seconds, "size": model_size(student), **correction, "train": asdict(config)}
    atomic_write_json(out_dir / "train" / "report.json", report)
    return report


def export_run(run_dir: str | Path, out_dir: str | Path, rank: int | None = None, merged: bool = False) -> dict[str, Any]:
    """The adapter of a finetune or correct run as a PEFT adapter in ``out_dir/adapter`` (cut to ``rank`` for a
    dynamic-rank run) and, with ``merged``, a float model with the adapter folded in, in ``out_dir/merged``."""
    adapter = Path(run_dir) / ADAPTER_DIR
    config, _ = read_adapter(adapter)
    model, tokenizer, _ = load_model(config["base_model_name_or_path"])
    attach_adapter(model, adapter)
    save_adapter(model, Path(out_dir) / "adapter", config["base_model_name_or_path"], rank)
    if merged:
        set_active_rank(model, rank)
        save_merged(model, tokenizer, Path(out_dir) / "merged")
    return {"rank": rank or config["r"], "base": config["base_model_name_or_path"], "merged": merged}


def _requantizer(manifest: dict[str, Any]) -> Quantizer:
    """The quantizer a directory was made with, to re-quantize ``W - s B A`` during LoftQ."""
    settings = {k: v for k, v in manifest["quantizer"].items() if k != "method"}
    return make_quantizer(manifest["quantizer"]["method"], **settings)


def _loftq_stats(
    teacher: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, calib: str, manifest: dict[str, Any]
) -> dict[str, LayerStats]:
    """Input statistics for LoftQ with a calibrated quantizer (OPTQ, QuIP#): the float teacher's layer
    inputs on windows of the correction text, as many and as long as the directory was calibrated with.
    Each layer is re-quantized on its own from the teacher's weight, so the teacher's inputs are the
    right ones (the "independent" calibration mode)."""
    recorded = manifest.get("calibration", {})
    windows = calibration_windows(
        tokenizer, read_text(calib), recorded.get("windows", 128), recorded.get("seq_len", 256), recorded.get("seed", 0)
    )
    return collect_stats(teacher, windows)


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return candidate
    return 0
