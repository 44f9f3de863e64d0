"""Crash-safe file writes and checksums: a write either lands whole or not at all."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
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
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise naming(exc, path) from None
        raise


def naming(exc: OSError, path: str | Path) -> OSError:
    """``exc`` with the file it concerns (a write through a file descriptor, as on a full disk, names none)."""
    return exc if exc.filename else OSError(exc.errno, exc.strerror, str(path))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_save_safetensors(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    path = Path(path)
    fd, tmp = _atomic_target(path)
    os.close(fd)
    try:
        try:
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        except SafetensorError as exc:
            raise _os_error(exc, path) from exc
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        _commit(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _os_error(exc: SafetensorError, path: Path) -> Exception:
    """safetensors reports a failed write (a full disk, a read-only folder) as its own error with the OS's code in
    the text; give it back as the ``OSError`` Python's own writes raise, naming the file."""
    code = re.search(r"os error (\d+)", str(exc))
    return OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) if code else exc


def file_manifest(directory: str | Path) -> dict[str, dict[str, Any]]:
    """``{relative path: {sha256, bytes}}`` for every file under ``directory``."""
    directory = Path(directory)
    return {
        p.relative_to(directory).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


SEAL = "manifest_sha256"  # a manifest's checksum of itself: an edited field is caught like an edited file


def _json_digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def seal(manifest: dict[str, Any]) -> dict[str, Any]:
    """``manifest`` with :data:`SEAL`, the sha256 of the rest of it."""
    return {**manifest, SEAL: _json_digest({k: v for k, v in manifest.items() if k != SEAL})}


def seal_matches(manifest: dict[str, Any]) -> bool:
    """Does ``manifest`` carry a seal that matches its content?"""
    return manifest.get(SEAL) == _json_digest({k: v for k, v in manifest.items() if k != SEAL})


def verify_seal(manifest: dict[str, Any], path: str | Path, required: bool = True) -> None:
    """Raise :class:`EngineError` naming ``path`` when ``manifest``'s seal does not match it (or, ``required``,
    is missing: an unsealed manifest passes only where older writers made none)."""
    if (required or SEAL in manifest) and not seal_matches(manifest):
        raise EngineError(f"{path}: edited or corrupt (it does not match its own checksum)")


_VERIFIED: set[tuple[Any, ...]] = set()  # files this process hashed and found right, with their identity then


def verify_file_manifest(directory: str | Path, files: dict[str, dict[str, Any]], listed_in: str) -> None:
    """Raise :class:`EngineError` naming the first file that is missing, truncated or altered.

    A file is hashed once per process while it stays the same file (device, inode, size, change times):
    a command reads a quantized directory's manifest several times, and hashing a 65B model's 26 GB took
    minutes each time."""
    directory = Path(directory)
    for name, entry in files.items():
        file = directory / name
        if not file.is_file():
            raise EngineError(f"{file}: missing (listed in {listed_in})")
        stat = file.stat()
        if stat.st_size != entry["bytes"]:
            raise EngineError(f"{file}: size {stat.st_size} bytes, expected {entry['bytes']} (truncated?)")
        identity = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, entry["sha256"])
        if identity in _VERIFIED:
            continue
        if sha256_file(file) != entry["sha256"]:
            raise EngineError(f"{file}: checksum mismatch (file altered or corrupt)")
        _VERIFIED.add(identity)


def staging_dir(out_dir: str | Path) -> Path:
    """A fresh temporary sibling of ``out_dir`` (named with this process's pid) to build a directory in before
    :func:`commit_dir`; what killed writers of ``out_dir`` left is tidied first (:func:`recover_dir`)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(out_dir)
    return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.staging-{os.getpid()}-", dir=out_dir.parent))


def commit_dir(staging: Path, out_dir: str | Path) -> None:
    """Put a finished ``staging`` directory at ``out_dir``, replacing an old one in two renames (a kill between
    them leaves the old one retired beside it, and :func:`recover_dir` puts it back)."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        retired = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, retired)
        os.replace(staging, out_dir)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, out_dir)


@contextmanager
def staged_dir(out_dir: str | Path, manifest: str | None = None) -> Iterator[Path]:
    """Build ``out_dir`` in a :func:`staging_dir` and put it in place whole (:func:`commit_dir`) when the block
    ends; on any failure the staging is removed and ``out_dir`` is left as it was.  With ``manifest``, the sha256
    of every file is written last, sealed, under that name."""
    staging = staging_dir(out_dir)
    try:
        yield staging
        if manifest is not None:
            atomic_write_json(staging / manifest, seal({"files": file_manifest(staging)}))
        commit_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_dir(out_dir: str | Path) -> None:
    """Tidy what writers of ``out_dir`` killed mid-write left beside it: a retired copy is put back when the kill
    came between :func:`commit_dir`'s two renames (``out_dir`` missing), other leftovers are removed.  Leftovers of
    live processes are theirs and stay."""
    out_dir = Path(out_dir)
    pattern = re.compile(rf"\.{re.escape(out_dir.name)}\.(staging|old)-(\d+)(-.*)?")
    if not out_dir.parent.is_dir():
        return
    for leftover in sorted(out_dir.parent.iterdir()):
        match = pattern.fullmatch(leftover.name)
        if match is None or not leftover.is_dir() or _alive(int(match[2])):
            continue
        if match[1] == "old" and not out_dir.exists():
            os.replace(leftover, out_dir)
        else:
            shutil.rmtree(leftover, ignore_errors=True)


# ---- output locks: one writer per output folder ---------------------------------------------------------------------

def lock_path(directory: str | Path) -> Path:
    """The lock of an output folder: a hidden sibling, so it survives the folder being swapped by :func:`commit_dir`."""
    directory = Path(directory).resolve()
    return directory.parent / f".{directory.name}.lock"


@contextmanager
def output_lock(directory: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on an output folder while the block runs (the kernel drops it if the process dies,
    so a crash leaves no stale lock).  A second writer gets one line naming the holder's pid."""
    path = lock_path(directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise EngineError(f"{Path(directory)}: in use by another modulora process (pid {holder}); wait for it to "
                          "finish or choose another output") from None
    try:
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as exc:  # a full disk
            raise naming(exc, path) from None
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


@contextmanager
def output_locks(*directories: str | Path | None) -> Iterator[None]:
    """:func:`output_lock` on each distinct folder given (``None`` skipped), all held together."""
    with ExitStack() as stack:
        for directory in dict.fromkeys(Path(d).resolve() for d in directories if d is not None):
            stack.enter_context(output_lock(directory))
        yield


# ---- block files: one safetensors file per decoder block, with an index of sizes and checksums ----------------------

BLOCK_INDEX = "blocks.json"
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


def block_path(directory: str | Path, index: int) -> Path:
    return Path(directory) / f"block_{index:05d}.safetensors"


def write_block(directory: str | Path, index: int, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Block ``index``'s tensors written (atomically) and dropped from the page cache; its index entry."""
    path = block_path(directory, index)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(path, {k: v.detach().cpu() for k, v in tensors.items()})
    entry = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    with open(path, "rb") as f:  # written and synced: drop it from the page cache (see read_safetensors)
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return entry


def write_block_index(directory: str | Path, entries: dict[int, dict[str, Any]]) -> None:
    atomic_write_json(Path(directory) / BLOCK_INDEX, {str(k): v for k, v in sorted(entries.items())})


def read_block_index(directory: str | Path) -> dict[int, dict[str, Any]]:
    path = Path(directory) / BLOCK_INDEX
    if not path.is_file():
        return {}
    try:
        return {int(k): v for k, v in json.loads(path.read_text()).items()}
    except (json.JSONDecodeError, ValueError, AttributeError) as exc:
        raise EngineError(f"{path}: corrupt block index ({exc})") from None


def read_safetensors(path: Path, pin: bool = False) -> dict[str, torch.Tensor]:
    """A safetensors file in one sequential read; the tensors are views of that one buffer (page-locked with
    ``pin``, so a copy to a GPU starts from it directly; torch's pinned-memory cache reuses such buffers)."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
        header.pop("__metadata__", None)
        data_len = max((entry["data_offsets"][1] for entry in header.values()), default=0)
        buffer = torch.empty(data_len, dtype=torch.uint8, pin_memory=pin)
        if f.readinto(buffer.numpy()) != data_len:
            raise EngineError(f"{path}: truncated block file")
        # Like O_DIRECT: a streamed block is not read again soon, so leave the page cache to others
        # (and every fetch a real read from the disk).
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    tensors = {}
    for name, entry in header.items():
        start, end = entry["data_offsets"]
        dtype = SAFETENSORS_DTYPES[entry["dtype"]]
        raw = buffer[start:end]
        if start % dtype.itemsize:  # unaligned: safetensors orders by alignment, so this is rare
            raw = raw.clone()
        tensors[name] = raw.view(dtype).view(entry["shape"])
    return tensors


def read_tensors(
    path: str | Path, names: list[str] | None = None, header: tuple[dict[str, Any], int] | None = None
) -> dict[str, torch.Tensor]:
    """Named tensors of a safetensors file (all by default), each read into its own buffer by plain reads.

    No memory map: a mapped file's pages, once touched, count in the process's RSS until it is unmapped, so a
    checkpoint read tensor by tensor through a kept ``safe_open`` handle grows to the size of the checkpoint.
    ``header`` is :func:`safetensors_header`'s answer, for a caller reading one file many times.
    """
    entries, data_start = header or safetensors_header(path)
    tensors = {}
    with open(path, "rb") as f:
        for name in entries if names is None else names:
            if name not in entries:
                raise EngineError(f"{path}: no tensor {name!r}")
            entry = entries[name]
            start, end = entry["data_offsets"]
            buffer = torch.empty(end - start, dtype=torch.uint8)
            f.seek(data_start + start)
            if f.readinto(buffer.numpy()) != end - start:
                raise EngineError(f"{path}: truncated at tensor {name!r}")
            tensors[name] = buffer.view(SAFETENSORS_DTYPES[entry["dtype"]]).view(entry["shape"])
    return tensors


def safetensors_header(path: str | Path) -> tuple[dict[str, Any], int]:
    """A safetensors file's header (tensor name -> dtype, shape, data offsets) and where its data starts."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    header.pop("__metadata__", None)
    return header, 8 + header_len
