"""The export use case: a run's adapter as a PEFT adapter (cut to a rank) and, optionally, merged into a float
model that transformers loads alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.export import attach_adapter, read_adapter, save_adapter, save_merged
from engine.model import load_model, set_active_rank
from engine.pipelines.loading import ADAPTER_DIR
from engine.pipelines.specs import ExportSpec


def export(spec: ExportSpec) -> dict[str, Any]:
    """``OUT/adapter`` and, with ``merged``, ``OUT/merged``; returns what was written."""
    adapter = Path(spec.run) / ADAPTER_DIR
    config, _ = read_adapter(adapter)
    base = config["base_model_name_or_path"]
    model, tokenizer, _ = load_model(base)
    attach_adapter(model, adapter)
    save_adapter(model, Path(spec.out) / "adapter", base, spec.rank)
    if spec.merged:
        set_active_rank(model, spec.rank)
        save_merged(model, tokenizer, Path(spec.out) / "merged")
    return {"rank": spec.rank or config["r"], "base": base, "merged": spec.merged}
