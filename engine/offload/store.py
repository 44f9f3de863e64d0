"""Where each decoder block's packed weights live between uses: device, host RAM or disk.

A store holds, per block index, the flat ``{name: tensor}`` dict of that
block's quantized-weight buffers.  :meth:`BlockStore.fetch` returns them ready
to compute with on the compute device; it may run on a prefetch thread, so it
touches nothing but the store's own data.

* ``device``: the tensors stay on the compute device; fetch is free.
* ``host``: CPU RAM (page-locked when the compute device is CUDA, so the copy
  to the GPU can overlap compute).  On a CPU-only machine host *is* the device.
* ``disk``: one safetensors file per block; a fetch is one large sequential
  read into a fresh buffer that the tensors then view (no second copy, and
  nothing file-backed counted in the process's RSS as ``mmap`` would be).
"""

from __future__ import annotations

import json
import os
import struct
import threading
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

import torch

from engine.errors import EngineError
from engine.storage import atomic_save_safetensors, atomic_write_json, sha256_file

Tensors = dict[str, torch.Tensor]
TIERS = ("device", "host", "disk")
INDEX_FILE = "blocks.json"
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


def tensors_nbytes(tensors: Tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


class BlockStore(ABC):
    """Per-block packed tensors on one tier; counts the bytes its fetches move."""

    tier: ClassVar[str]

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.bytes_fetched = 0
        self._lock = threading.Lock()

    @abstractmethod
    def put(self, index: int, tensors: Tensors) -> None:
        """Take ownership of block ``index``'s tensors."""

    @abstractmethod
    def _load(self, index: int) -> Tensors:
        """Block ``index``'s tensors on the compute device."""

    @abstractmethod
    def nbytes(self, index: int) -> int:
        """Bytes block ``index`` occupies on this tier."""

    @abstractmethod
    def __contains__(self, index: int) -> bool: ...

    def fetch(self, index: int) -> Tensors:
        if index not in self:
            raise EngineError(f"{self.tier} store has no block {index}")
        tensors = self._load(index)
        with self._lock:
            self.bytes_fetched += self.nbytes(index) if self.tier != "device" else 0
        return tensors


class DeviceStore(BlockStore):
    tier = "device"

    def __init__(self, device: torch.device | str = "cpu") -> None:
        super().__init__(device)
        self._blocks: dict[int, Tensors] = {}

    def put(self, index: int, tensors: Tensors) -> None:
        self._blocks[index] = {k: v.to(self.device) for k, v in tensors.items()}

    def _load(self, index: int) -> Tensors:
        return self._blocks[index]

    def nbytes(self, index: int) -> int:
        return tensors_nbytes(self._blocks[index])

    def __contains__(self, index: int) -> bool:
        return index in self._blocks


class HostStore(DeviceStore):
    tier = "host"

    def put(self, index: int, tensors: Tensors) -> None:
        pin = self.device.type == "cuda"
        self._blocks[index] = {k: (v.cpu().pin_memory() if pin else v.cpu()) for k, v in tensors.items()}

    def _load(self, index: int) -> Tensors:
        return {k: v.to(self.device, non_blocking=True) for k, v in self._blocks[index].items()}


class DiskStore(BlockStore):
    """``block_00000.safetensors`` ... under ``directory``, indexed (sizes, sha256) in ``blocks.json``."""

    tier = "disk"

    def __init__(self, directory: str | Path, device: torch.device | str = "cpu") -> None:
        super().__init__(device)
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        index_path = self.directory / INDEX_FILE
        self._index: dict[int, dict[str, object]] = {}
        if index_path.is_file():
            self._index = {int(k): v for k, v in json.loads(index_path.read_text()).items()}

    def path(self, index: int) -> Path:
        return self.directory / f"block_{index:05d}.safetensors"

    def put(self, index: int, tensors: Tensors) -> None:
        path = self.path(index)
        atomic_save_safetensors(path, {k: v.detach().cpu() for k, v in tensors.items()})
        self._index[index] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
        with open(path, "rb") as f:  # written and synced: drop it from the page cache (see read_safetensors)
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        atomic_write_json(self.directory / INDEX_FILE, {str(k): v for k, v in sorted(self._index.items())})

    def verify(self) -> None:
        """Check every block file against its recorded sha256 (a crash or a bad disk shows here)."""
        for index, entry in self._index.items():
            if sha256_file(self.path(index)) != entry["sha256"]:
                raise EngineError(f"{self.path(index)}: checksum mismatch with {self.directory / INDEX_FILE}")

    def _load(self, index: int) -> Tensors:
        tensors = read_safetensors(self.path(index))
        if self.device.type != "cpu":
            tensors = {k: v.pin_memory().to(self.device, non_blocking=True) for k, v in tensors.items()}
        return tensors

    def nbytes(self, index: int) -> int:
        return int(self._index[index]["bytes"])

    def __contains__(self, index: int) -> bool:
        return index in self._index


def read_safetensors(path: Path) -> Tensors:
    """A safetensors file in one sequential read; the tensors are views of that one buffer."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
        header.pop("__metadata__", None)
        data_len = max((entry["data_offsets"][1] for entry in header.values()), default=0)
        buffer = torch.empty(data_len, dtype=torch.uint8)
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


def make_store(tier: str, device: torch.device | str = "cpu", directory: str | Path | None = None) -> BlockStore:
    if tier == "disk":
        if directory is None:
            raise EngineError("the disk tier needs a directory for its block files (--offload-dir)")
        return DiskStore(directory, device)
    if tier == "host":
        return HostStore(device)
    if tier == "device":
        return DeviceStore(device)
    raise EngineError(f"unknown offload tier {tier!r}; allowed: {', '.join(TIERS)}")
