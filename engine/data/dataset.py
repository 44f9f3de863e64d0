"""From a data file to padded training batches."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from engine.data.formats import IGNORE, SEGMENTERS, FormatSpec, check_format, encode_segments, pack_text
from engine.data.records import load_records, require_columns
from engine.data.text import text_for
from engine.errors import EngineError

TEXT_SUFFIX = ".txt"  # a plain text file: one document, the whole file (engine.data.records.LOADERS)


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]


def check_data(path: str | Path, spec: FormatSpec) -> None:
    """Fail fast (before any model is loaded) on an unknown format, a missing file or column."""
    check_format(spec.name)
    if spec.name == "text" and Path(path).suffix == TEXT_SUFFIX:  # one text column by construction: not read here
        if not Path(path).is_file():
            raise EngineError(f"{path}: no such file")
        return
    require_columns(load_records(path, spec.split), spec.required_columns(), path)


def build_examples(
    path: str | Path,
    spec: FormatSpec,
    tokenizer: PreTrainedTokenizerBase,
    seq_len: int,
    limit: int | None = None,
) -> list[Example]:
    """Tokenized examples of a data file in the given format (at most ``limit`` rows or windows)."""
    check_data(path, spec)
    if spec.name == "text":
        if Path(path).suffix == TEXT_SUFFIX:  # a plain text file: only the prefix ``limit`` windows use is read
            texts = [text_for(tokenizer, path, limit and limit * seq_len)]
        else:
            texts = load_records(path, spec.split)[spec.column("text")]
        return [Example(w, list(w)) for w in pack_text(texts, tokenizer, seq_len)[:limit]]
    records = load_records(path, spec.split)
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
