"""Read local data files into a ``datasets.Dataset`` (json, jsonl, csv, tsv, parquet, txt).

Only local files: the engine never downloads data at run time.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from engine.errors import EngineError

if TYPE_CHECKING:  # imported where rows are read: plain-text training and evaluation never need it
    import datasets

LOADERS = {
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"delimiter": "\t", "quoting": csv.QUOTE_NONE}),
    ".parquet": ("parquet", {}),
    ".txt": ("text", {"sample_by": "document"}),
}


def load_records(path: str | Path) -> datasets.Dataset:
    """All rows of a local data file; plain text comes back as one ``text`` row for the whole file."""
    path = Path(path)
    if not path.is_file():
        raise EngineError(f"{path}: no such file")
    if path.suffix not in LOADERS:
        raise EngineError(f"{path}: unsupported file type {path.suffix!r}; allowed: {', '.join(LOADERS)}")
    builder, options = LOADERS[path.suffix]
    import datasets

    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train", **options)
    except (ValueError, datasets.exceptions.DatasetGenerationError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise EngineError(f"{path}: cannot read as {builder} ({reason})") from None


def require_columns(records: datasets.Dataset, columns: Iterable[str], path: str | Path) -> None:
    """Fail with the file and the first missing column named."""
    for column in columns:
        if column not in records.column_names:
            raise EngineError(
                f"{path}: missing column {column!r} (found: {', '.join(records.column_names)})"
            )
