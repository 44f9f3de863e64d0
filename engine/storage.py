"""Crash-safe file writes and checksums: a write either lands whole or not at all."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from engine.errors import EngineError


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _atomic_target(path: Path) -> tuple[int, str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    return tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)


def _commit(tmp: str, path: Path) -> None:
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = _atomic_target(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _commit(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_save_safetensors(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    path = Path(path)
    fd, tmp = _atomic_target(path)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        _commit(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def file_manifest(directory: str | Path) -> dict[str, dict[str, Any]]:
    """``{name: {sha256, bytes}}`` for every file directly in ``directory``."""
    return {
        p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(Path(directory).iterdir())
        if p.is_file()
    }


def verify_file_manifest(directory: str | Path, files: dict[str, dict[str, Any]], listed_in: str) -> None:
    """Raise :class:`EngineError` naming the first file that is missing, truncated or altered."""
    directory = Path(directory)
    for name, entry in files.items():
        file = directory / name
        if not file.is_file():
            raise EngineError(f"{file}: missing (listed in {listed_in})")
        if file.stat().st_size != entry["bytes"]:
            raise EngineError(f"{file}: size {file.stat().st_size} bytes, expected {entry['bytes']} (truncated?)")
        if sha256_file(file) != entry["sha256"]:
            raise EngineError(f"{file}: checksum mismatch (file altered or corrupt)")


def staging_dir(out_dir: str | Path) -> Path:
    """A fresh temporary sibling of ``out_dir`` to build a directory in before :func:`commit_dir`."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))


def commit_dir(staging: Path, out_dir: str | Path) -> None:
    """Put a finished ``staging`` directory at ``out_dir``, replacing an old one in two renames."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        retired = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, retired)
        os.replace(staging, out_dir)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, out_dir)
