"""From a data file to padded training batches."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from engine.data.formats import IGNORE, SEGMENTERS, FormatSpec, check_format, encode_segments, pack_text
from engine.data.records import load_records, require_columns


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]


def check_data(path: str | Path, spec: FormatSpec) -> None:
    """Fail fast (before any model is loaded) on an unknown format, a missing file or column."""
    check_format(spec.name)
    require_columns(load_records(path), spec.required_columns(), path)


def build_examples(
    path: str | Path,
    spec: FormatSpec,
    tokenizer: PreTrainedTokenizerBase,
    seq_len: int,
    limit: int | None = None,
) -> list[Example]:
    """Tokenized examples of a data file in the given format (at most ``limit`` rows or windows)."""
    check_data(path, spec)
    records = load_records(path)
    if spec.name == "text":
        windows = pack_text(records[spec.column("text")], tokenizer, seq_len)[:limit]
        return [Example(w, list(w)) for w in windows]
    rows = records if limit is None else records.select(range(min(limit, len(records))))
    segment = SEGMENTERS[spec.name]
    return [Example(*encode_segments(segment(spec, row, tokenizer), tokenizer, seq_len)) for row in rows]


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``labels`` (padding ignored) and ``attention_mask``."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}
