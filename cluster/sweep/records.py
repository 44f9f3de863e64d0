"""Finished trials, recorded by the project itself: one checksummed JSON per grid point in ``trial-results/``.

A continued sweep reads these, never Ray Tune's saved experiment (``tuner.pkl``, ``params.pkl``: pickles,
which would run code planted in a sweep folder, possibly on shared storage).  A record that is unreadable,
fails its checksum or names another point is ignored with a warning, and its trial runs again.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from engine.storage import atomic_write_json, seal, seal_matches

from cluster.sweep.spec import Point

RECORDS = "trial-results"


def record_path(sweep_dir: str | Path, point: Point) -> Path:
    return Path(sweep_dir) / RECORDS / f"{point.name}.json"


def write_record(sweep_dir: str | Path, point: Point, metrics: dict[str, Any]) -> None:
    """Record ``point`` as finished with ``metrics`` (atomically: a record is whole or absent)."""
    atomic_write_json(record_path(sweep_dir, point), seal({"point": asdict(point), "metrics": metrics}))


def read_records(sweep_dir: str | Path, points: list[Point]) -> dict[Point, dict[str, Any]]:
    """The metrics of every point of ``points`` with a valid record."""
    found = {}
    for point in points:
        path = record_path(sweep_dir, point)
        if not path.is_file():
            continue
        try:
            record = json.loads(path.read_text())
            valid = seal_matches(record) and Point(**record["point"]) == point
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
            valid = False
        if valid:
            found[point] = record["metrics"]
        else:
            click.echo(f"modulora: warning: {path}: not a valid trial record (edited or damaged); running "
                       f"{point.name} again", err=True)
    return found
