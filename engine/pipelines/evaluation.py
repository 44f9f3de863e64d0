"""The evaluate use case: a model (float, quantized, corrected or finetuned) scored on its tasks."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from engine.data import check_data
from engine.eval import task_metric
from engine.model import check_context, model_size, set_active_rank
from engine.pipelines.loading import attach_offload, load_with_adapter, streams_in_place
from engine.placement import resolve_device
from engine.pipelines.specs import EvalSpec


def evaluate(spec: EvalSpec, progress: bool = True) -> dict[str, Any]:
    """``{"model", sizes..., "tasks": {label: metrics}}``; a task with ``ranks`` gives
    ``{"ranks": {rank: metrics}}``, the dynamic-rank adapter cut to each rank in turn."""
    device = resolve_device(spec.device)
    for task in spec.tasks:
        check_data(task.data.file, task.data.format_spec())  # before the (possibly long) model load
    model, tokenizer, _ = load_with_adapter(spec.model, stream=streams_in_place(spec.model, spec.offload))
    for task in spec.tasks:
        check_context(model.config, task.data.seq_len, "--seq-len")
    report: dict[str, Any] = {"model": spec.model, **model_size(model), "tasks": {}}
    with tempfile.TemporaryDirectory(prefix="modulora-eval-blocks-") as scratch:
        streamer = attach_offload(model, spec.model, spec.offload, Path(scratch), device)
        try:
            _score(model, tokenizer, spec, report, progress)
        finally:
            if streamer is not None:
                streamer.close()
    return report


def _score(model: Any, tokenizer: Any, spec: EvalSpec, report: dict[str, Any], progress: bool) -> None:
    for task in spec.tasks:
        d = task.data
        metric = task_metric(d.format, d.file, tokenizer, d.format_spec(), d.limit, d.seq_len, task.batch_size,
                             progress)
        if task.ranks:
            per_rank = {}
            for rank in task.ranks:
                set_active_rank(model, rank)
                per_rank[str(rank)] = metric(model)
            set_active_rank(model, None)
            report["tasks"][task.label] = {"ranks": per_rank}
        else:
            report["tasks"][task.label] = metric(model)
