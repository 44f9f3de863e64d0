"""The export use case: a run's adapter as a PEFT adapter (cut to a rank) and, optionally, merged into a float
model that transformers loads alone, its base in the GPTQ layout, or both as GGUF files for llama.cpp; each written
one decoder block at a time (a quantized directory's blocks are read from its files one by one, its vocabulary
tables copied from its outside file)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from engine.errors import EngineError
from engine.export import attach_adapter, gguf_template, read_adapter, save_adapter, save_gguf, save_gptq, save_merged
from engine.model import (
    OUTSIDE, BlockLifecycle, is_quantized_dir, load_block_weights, load_model, read_manifest, release_block_weights,
    set_active_rank, vocab_table_names,
)
from engine.pipelines.loading import ADAPTER_DIR, ADAPTER_INIT_DEVICE
from engine.pipelines.specs import COMPUTE_DTYPES, ExportSpec
from engine.placement import resolve_device
from engine.pipelines.locking import holding_outputs
from engine.pipelines.runs import check_replaceable
from engine.storage import read_tensors


@holding_outputs(lambda spec: (spec.out,), lambda spec: (spec.run,))
def export(spec: ExportSpec) -> dict[str, Any]:
    """``OUT/adapter``, with ``merged`` ``OUT/merged``, with ``gptq`` ``OUT/gptq``, with ``gguf`` ``OUT/gguf``;
    returns what was written."""
    check_replaceable(spec.out, spec.overwrite)
    device = resolve_device(spec.device)
    adapter = Path(spec.run) / ADAPTER_DIR
    config, _ = read_adapter(adapter)
    base = config["base_model_name_or_path"]
    if spec.gptq and not is_quantized_dir(base):
        raise EngineError(f"--gptq writes a quantized directory's base in the GPTQ layout; {base} is not one")
    stream = (spec.merged or spec.gptq or spec.gguf) and is_quantized_dir(base) and read_manifest(base)["format_version"] == 2
    model, tokenizer, manifest = load_model(base, stream=stream)
    template = gguf_template(base, manifest) if spec.gguf else None
    attach_adapter(model, adapter, device=ADAPTER_INIT_DEVICE, base_manifest=manifest)
    save_adapter(model, Path(spec.out) / "adapter", base, spec.rank)
    blocks, extra = None, None
    if stream:  # the blocks' packed weights read one block at a time, the vocabulary tables from the outside file
        blocks = BlockLifecycle(lambda i: load_block_weights(model, base, i), lambda i: release_block_weights(model, i))
        extra = lambda: _tables(model, Path(base))  # noqa: E731
    if spec.gptq:
        save_gptq(model, tokenizer, Path(spec.out) / "gptq", blocks, extra)
    set_active_rank(model, spec.rank)
    if spec.merged:
        save_merged(model, tokenizer, Path(spec.out) / "merged", COMPUTE_DTYPES[spec.dtype], blocks, extra, device)
    if template is not None:
        save_gguf(model, template, Path(spec.out) / "gguf", spec.gguf, spec.rank or config["r"], blocks, device)
    return {"rank": spec.rank or config["r"], "base": base, "merged": spec.merged, "gptq": spec.gptq,
            "gguf": spec.gguf}


def _tables(model: Any, base: Path) -> dict[str, torch.Tensor]:
    """The vocabulary tables a streamed model left in its directory's outside file."""
    return read_tensors(base / OUTSIDE, list(vocab_table_names(model).values()))
