"""The quantize use case: a float model (or a quantized GGUF file) into a checksummed quantized directory."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from engine.data import calibration_windows, read_text
from engine.model import (
    RunnerFactory,
    ShardRunner,
    load_float_model,
    load_gguf_quantized,
    quantize_calibrated,
    quantize_model,
    save_quantized,
)
from engine.options import as_plain
from engine.pipelines.specs import GGUF_METHOD, QuantizeSpec
from engine.storage import sha256_file


def quantize(spec: QuantizeSpec, runner_factory: RunnerFactory = ShardRunner) -> dict[str, Any]:
    """Write ``spec.out``; returns its manifest.  ``runner_factory`` runs the calibration shards elsewhere
    (``modulora calibrate`` passes Ray's; the weights are the same bit for bit)."""
    if spec.method == GGUF_METHOD:
        model, tokenizer, manifest = load_gguf_quantized(spec.model)
        return save_quantized(model, tokenizer, spec.out, {k: manifest[k] for k in ("source_model", "quantizer")})
    quantizer = spec.quantizer()
    model, tokenizer = load_float_model(spec.model)
    start = time.perf_counter()
    info: dict[str, Any] = {"source_model": _source(spec.model), "quantizer": quantizer.describe()}
    if spec.calib is None:
        quantize_model(model, quantizer)
    else:
        c = spec.calib
        windows = calibration_windows(tokenizer, read_text(c.file), c.windows, c.seq_len, c.seed)
        quantize_calibrated(model, quantizer, windows, mode=c.mode, asym_alpha=c.asym, runner_factory=runner_factory)
        info["calibration"] = {**as_plain(c), "file": str(Path(c.file).resolve()), "sha256": sha256_file(c.file),
                               "asym_alpha": c.asym}
    info["quantize_seconds"] = time.perf_counter() - start
    return save_quantized(model, tokenizer, spec.out, info)


def _source(model: str) -> str:
    """A local model as its absolute path (a hub id as it is), so the record holds from any folder."""
    return str(Path(model).resolve()) if Path(model).exists() else model
