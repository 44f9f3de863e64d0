"""Training checkpoints: adapter, optimizer and trainer state, checksummed and atomic.

``ROOT/step-000120/`` holds ``adapter.safetensors``, ``optimizer.safetensors``,
``rng.safetensors``, ``trainer.json`` and a ``manifest.json`` with the sha256 of
each.  A checkpoint is built in a temporary directory and renamed into place,
so a crash leaves the previous one intact; only the last ``keep_last`` are
kept.  On resume the newest checkpoint that verifies is used, and any newer
broken one is reported.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from engine.errors import EngineError
from engine.storage import (
    atomic_save_safetensors,
    atomic_write_json,
    file_manifest,
    staged_dir,
    verify_file_manifest,
)

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
PREFIX = "step-"


@dataclass
class Checkpoint:
    path: Path
    adapter: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor]
    rng: dict[str, torch.Tensor]
    state: dict[str, Any]


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer ``state_dict`` split into flat tensors and JSON-able scalars (no pickle)."""
    state_dict = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for index, entries in state_dict["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().cpu().clone()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"scalars": scalars, "param_groups": state_dict["param_groups"]}


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for flat, value in [*tensors.items(), *meta["scalars"].items()]:
        index, key = flat.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_tensors(generators: dict[str, torch.Generator]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every random state a run depends on: torch's global RNG, named generators, Python's ``random``."""
    tensors = {"torch": torch.get_rng_state(), **{name: g.get_state() for name, g in generators.items()}}
    version, internal, gauss = random.getstate()
    return tensors, {"python_random": [version, list(internal), gauss]}


def restore_rng(generators: dict[str, torch.Generator], tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    for name, generator in generators.items():
        generator.set_state(tensors[name])
    version, internal, gauss = meta["python_random"]
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(
    root: str | Path,
    step: int,
    adapter: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    generators: dict[str, torch.Generator],
    state: dict[str, Any],
    keep_last: int = 2,
) -> Path:
    root = Path(root)
    out = root / f"{PREFIX}{step:06d}"
    with staged_dir(out) as staging:
        opt_tensors, opt_meta = optimizer_tensors(optimizer)
        rng, rng_meta = rng_tensors(generators)
        atomic_save_safetensors(staging / "adapter.safetensors", adapter)
        atomic_save_safetensors(staging / "optimizer.safetensors", opt_tensors)
        atomic_save_safetensors(staging / "rng.safetensors", rng)
        atomic_write_json(staging / "trainer.json", {**state, "step": step, "optimizer": opt_meta, "rng": rng_meta})
        atomic_write_json(staging / MANIFEST, {"files": file_manifest(staging)})
    for old in checkpoint_dirs(root)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return out


def checkpoint_dirs(root: str | Path) -> list[Path]:
    """Checkpoint directories, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit())


def read_checkpoint(path: Path) -> Checkpoint:
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise EngineError(f"{path}: no {MANIFEST}")
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise EngineError(f"{manifest_path}: corrupt ({exc})") from None
    verify_file_manifest(path, files, MANIFEST)
    return Checkpoint(
        path=path,
        adapter=load_file(str(path / "adapter.safetensors")),
        optimizer=load_file(str(path / "optimizer.safetensors")),
        rng=load_file(str(path / "rng.safetensors")),
        state=json.loads((path / "trainer.json").read_text()),
    )


def latest_good_checkpoint(root: str | Path) -> Checkpoint | None:
    """The newest checkpoint that verifies; broken newer ones are logged and skipped."""
    for path in reversed(checkpoint_dirs(root)):
        try:
            return read_checkpoint(path)
        except EngineError as exc:
            log.warning("skipping corrupt checkpoint: %s", exc)
    return None
