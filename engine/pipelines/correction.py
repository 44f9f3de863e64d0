"""The correct use case (LREC): LoRA on every decoder linear of a quantized model, trained to match its float
teacher.  ``OUT`` is itself a corrected model: a quantized directory (its base re-quantized by the LoftQ
initialisation) with ``adapter/`` inside, and the training run in ``OUT/train``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from engine.data import FormatSpec, build_examples, calibration_windows, check_data, read_text
from engine.errors import EngineError
from engine.export import save_adapter
from engine.model import add_lora, collect_stats, is_quantized_dir, load_float_model, load_model, model_size, save_quantized
from engine.options import as_plain
from engine.pipelines.loading import ADAPTER_DIR, pad_id
from engine.pipelines.specs import CorrectSpec
from engine.quant import LayerStats, Quantizer, make_quantizer
from engine.storage import atomic_write_json
from engine.train import Trainer, distillation_loss, loftq_init

MANIFEST_ONLY = ("layers", "aliases", "size", "files", "format_version")  # what save_quantized writes anew


def correct(spec: CorrectSpec) -> dict[str, Any]:
    """Write the corrected model to ``spec.out``; returns the training report."""
    out = Path(spec.out)
    text = FormatSpec("text")
    check_data(spec.calib, text)
    if not is_quantized_dir(spec.model):
        raise EngineError(f"{spec.model}: not a quantized model directory (correct needs one)")
    student, tokenizer, manifest = load_model(spec.model)
    teacher_source = spec.teacher or manifest.get("source_model")
    if not teacher_source:
        raise EngineError(f"{spec.model}: no source_model in its manifest; pass the teacher model")
    teacher, _ = load_float_model(teacher_source)
    lora = spec.lora
    correction = {"teacher": str(teacher_source), "calib": spec.calib, "rank": spec.rank, "init": spec.init,
                  "ce_weight": spec.ce_weight}
    if spec.resume and (out / "modulora.json").is_file():
        student, tokenizer, _ = load_model(out)  # the base as initialised (LoftQ) before the interruption
        add_lora(student, lora.adapter_rank, lora.scale_alpha, seed=spec.train.seed)
    else:
        add_lora(student, lora.adapter_rank, lora.scale_alpha, seed=spec.train.seed)
        if spec.init == "loftq":
            quantizer = _requantizer(manifest)
            stats = _loftq_stats(teacher, tokenizer, spec.calib, manifest) if quantizer.needs_calibration else None
            loftq_init(student, teacher, quantizer, spec.loftq_iters, stats)
        info = {k: v for k, v in manifest.items() if k not in MANIFEST_ONLY}
        save_quantized(student, tokenizer, out, {**info, "correction": correction})
    examples = build_examples(spec.calib, text, tokenizer, spec.seq_len, spec.limit)
    loss = distillation_loss(teacher, spec.ce_weight)
    start = time.perf_counter()
    trainer = Trainer(student, examples, spec.train, out / "train", pad_id(tokenizer), loss_fn=loss)
    metrics = trainer.train(resume=spec.resume)
    seconds = time.perf_counter() - start
    save_adapter(student, out / ADAPTER_DIR, str(out.resolve()))
    report = {"spec": as_plain(spec), "final": metrics, "train_seconds": seconds, "size": model_size(student),
              **correction}
    atomic_write_json(out / "train" / "report.json", report)
    return report


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
    recorded = manifest["calibration"]
    windows = calibration_windows(tokenizer, read_text(calib), recorded["windows"], recorded["seq_len"],
                                  recorded["seed"])
    return collect_stats(teacher, windows)
