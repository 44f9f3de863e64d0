"""Read data into a ``datasets.Dataset``: local files (json, jsonl, csv, tsv, parquet, txt, each also compressed),
folders written by ``datasets``' ``save_to_disk``, and hub dataset ids (downloaded by ``datasets`` only where the
hub is reachable; offline, one line says it was tried).
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

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


COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")  # what ``datasets`` decompresses on its own
DEFAULT_SPLIT = "train"


def file_type(path: Path) -> str:
    """The suffix that says how a file is read, under any compression suffix (``rows.jsonl.gz``: ``.jsonl``)."""
    suffixes = path.suffixes
    return suffixes[-2] if len(suffixes) > 1 and suffixes[-1] in COMPRESSIONS else path.suffix


def is_saved_dataset(path: Path) -> bool:
    """A folder ``datasets``' ``save_to_disk`` wrote (a ``Dataset`` or a ``DatasetDict``)."""
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def looks_like_hub_id(value: str) -> bool:
    return value.count("/") == 1 and not value.startswith((".", "/", "~")) and not Path(value).suffix


def check_source(path: str | Path) -> None:
    """Fail fast on what cannot be data: a missing local path (that is no hub id) or an unknown file type."""
    path = Path(path)
    if path.is_dir():
        if not is_saved_dataset(path):
            raise EngineError(f"{path}: a folder, but not one written by datasets' save_to_disk")
    elif path.is_file():
        if file_type(path) not in LOADERS:
            raise EngineError(f"{path}: unsupported file type {file_type(path)!r}; allowed: {', '.join(LOADERS)} "
                              f"(each also as {', '.join(COMPRESSIONS)})")
    elif not looks_like_hub_id(str(path)):
        raise EngineError(f"{path}: no such file")


def load_records(path: str | Path, split: str | None = None) -> datasets.Dataset:
    """All rows of ``path``'s ``split`` (default ``train``); plain text comes back as one ``text`` row for the
    whole file."""
    check_source(path)
    import datasets

    datasets.disable_progress_bars()
    path = Path(path)
    if path.is_dir():
        return _split_of(datasets.load_from_disk(str(path)), split, path)
    if not path.exists():
        return _from_hub(str(path), split)
    builder, options = LOADERS[file_type(path)]
    if split not in (None, DEFAULT_SPLIT):
        raise EngineError(f"{path}: a single file has no split {split!r} (it is the {DEFAULT_SPLIT!r} split)")
    try:
        return datasets.load_dataset(builder, data_files=str(path), split=DEFAULT_SPLIT, **options)
    except (ValueError, OSError, datasets.exceptions.DatasetGenerationError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise EngineError(f"{path}: cannot read as {builder} ({reason})") from None


def _split_of(saved: Any, split: str | None, path: Path) -> datasets.Dataset:
    import datasets

    if isinstance(saved, datasets.Dataset):
        if split not in (None, DEFAULT_SPLIT):
            raise EngineError(f"{path}: holds one dataset, not splits; drop the split {split!r}")
        return saved
    wanted = split or DEFAULT_SPLIT
    if wanted not in saved:
        raise EngineError(f"{path}: no split {wanted!r}; it has {', '.join(saved)} (choose one with --split)")
    return saved[wanted]


def _from_hub(dataset_id: str, split: str | None) -> datasets.Dataset:
    import datasets

    try:
        return datasets.load_dataset(dataset_id, split=split or DEFAULT_SPLIT)
    except Exception as exc:  # offline, unknown id, gated: whatever the hub client raised
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise EngineError(f"{dataset_id}: not a local file or folder, and the hub dataset could not be had "
                          f"({type(exc).__name__}: {reason})") from None


def require_columns(records: datasets.Dataset, columns: Iterable[str], path: str | Path) -> None:
    """Fail with the file and the first missing column named."""
    for column in columns:
        if column not in records.column_names:
            raise EngineError(
                f"{path}: missing column {column!r} (found: {', '.join(records.column_names)})"
            )
