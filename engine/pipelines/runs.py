"""Outputs are not replaced by accident.  A run folder (finetune, correct) belongs to one run: a second run is not
started over it by accident, and ``--resume`` continues only the run it was started as.

The run's settings are recorded, sealed, in ``run.json`` when it starts.  Without ``--resume`` a folder that
already holds something is refused unless ``--overwrite`` (which deletes it first); with ``--resume`` every
recorded setting must be the same except those that do not change what is trained (:data:`MAY_CHANGE`), unless
``--force``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from engine.errors import EngineError
from engine.options import as_plain
from engine.pipelines.specs import CorrectSpec, FinetuneSpec
from engine.storage import atomic_write_json, seal, verify_seal

RUN_SPEC = "run.json"
# Settings a resumed run may change: where it runs and writes, how far it goes and how often it saves or evaluates.
MAY_CHANGE = ("out", "resume", "force", "overwrite", "device", "offload.tier", "offload.dir", "offload.prefetch",
              "parallel.workers", "parallel.threads", "parallel.address", "parallel.max_failures",
              "train.steps", "train.save_every", "train.keep_last", "train.eval_every", "eval_data", "eval_limit")


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_run_folder(spec: FinetuneSpec | CorrectSpec, out: Path, record: Path) -> None:
    """Refuse to start ``spec`` in ``out`` (settings recorded at ``record``) as the module docstring says; with
    ``--overwrite``, empty ``out`` first."""
    if spec.resume:
        if not record.is_file():
            return  # a run started before runs were recorded, or one killed before it recorded itself
        try:
            saved = json.loads(record.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise EngineError(f"{record}: unreadable ({exc})") from None
        verify_seal(saved, record)
        now = _flat(as_plain(spec))
        changed = [k for k in sorted(set(now) | set(saved["spec"])) if k not in MAY_CHANGE
                   and now.get(k) != saved["spec"].get(k)]
        if changed and not spec.force:
            shown = ", ".join(f"{k} ({saved['spec'].get(k)!r} -> {now.get(k)!r})" for k in changed[:4])
            raise EngineError(f"{out}: --resume with settings that differ from the run's: {shown}; pass --force to "
                              "continue anyway, or start a new run elsewhere")
    elif holds_something(out):
        if not spec.overwrite:
            raise EngineError(f"{out}: holds a run already; --resume continues it, --overwrite deletes it and "
                              "starts again")
        shutil.rmtree(out)


def holds_something(out: Path) -> bool:
    return out.is_dir() and any(out.iterdir())


def check_replaceable(out: str | Path, overwrite: bool) -> None:
    """Refuse to replace a folder that holds something unless ``--overwrite`` (quantize, export: the old folder
    stays whole until the new one is complete and swapped in)."""
    if holds_something(Path(out)) and not overwrite:
        raise EngineError(f"{out}: exists and is not empty; --overwrite replaces it once the new one is complete")


def record_run(spec: FinetuneSpec | CorrectSpec, record: Path) -> None:
    """Write ``run.json``: the run's settings, sealed."""
    atomic_write_json(record, seal({"spec": _flat(as_plain(spec))}))
