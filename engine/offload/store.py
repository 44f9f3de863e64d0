"""Where each decoder block's packed weights live between uses: device, host RAM or disk.

A store holds, per block index, the flat ``{name: tensor}`` dict of that
block's quantized-weight buffers.  :meth:`BlockStore.fetch` returns them on the
compute device; it may run on a prefetch thread, so it touches nothing but the
store's own data.  On CUDA its host-to-device copies run on the store's own
copy stream, overlapping the compute on the default stream; the consumer calls
:meth:`BlockStore.ready` before computing with a block, which makes its stream
wait for that block's copies (an event, not a host sync) and hands the tensors
to that stream (``record_stream``), so their memory is not reused while it
still reads them.

* ``device``: the tensors stay on the compute device; fetch is free.
* ``host``: CPU RAM (page-locked when the compute device is CUDA, so the copy
  to the GPU can overlap compute).  On a CPU-only machine host *is* the device.
* ``disk``: one safetensors file per block; a fetch is one large sequential
  read into a fresh buffer that the tensors then view (no second copy, and
  nothing file-backed counted in the process's RSS as ``mmap`` would be).
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

import torch

from engine.errors import EngineError
from engine.model import CheckpointSource
from engine.storage import (
    BLOCK_INDEX, block_path, read_block_index, read_safetensors, sha256_file, write_block, write_block_index,
)

Tensors = dict[str, torch.Tensor]
TIERS = ("device", "host", "disk")


def tensors_nbytes(tensors: Tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


class BlockStore(ABC):
    """Per-block packed tensors on one tier; counts the bytes its fetches move."""

    tier: ClassVar[str]

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.bytes_fetched = 0
        self._lock = threading.Lock()
        self.copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._copied: dict[int, torch.cuda.Event] = {}

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

    @property
    def fetch_is_enqueue(self) -> bool:
        """Whether a fetch only enqueues copies on the copy stream (nothing to wait for on the host): the
        streamer then calls it inline, from the thread that launches the kernels, instead of on its prefetch
        thread, which competed for the GIL and left most copies exposed."""
        return False

    def fetch(self, index: int) -> Tensors:
        if index not in self:
            raise EngineError(f"{self.tier} store has no block {index}")
        if self.copy_stream is None:
            tensors = self._load(index)
        else:
            with torch.cuda.stream(self.copy_stream):
                tensors = self._load(index)
                copied = torch.cuda.Event()
                copied.record(self.copy_stream)
        with self._lock:
            self.bytes_fetched += self.nbytes(index) if self.tier != "device" else 0
            if self.copy_stream is not None:
                self._copied[index] = copied
        return tensors

    def ready(self, index: int, tensors: Tensors) -> Tensors:
        """``tensors`` (block ``index``'s fetch) safe to compute with on the current stream."""
        with self._lock:
            copied = self._copied.pop(index, None)
        if copied is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(copied)
            for tensor in tensors.values():
                tensor.record_stream(stream)
        return tensors


class DeviceStore(BlockStore):
    tier = "device"

    @property
    def fetch_is_enqueue(self) -> bool:
        return True

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

    @property
    def fetch_is_enqueue(self) -> bool:
        return self.copy_stream is not None

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
        self._index: dict[int, dict[str, object]] = read_block_index(self.directory)

    def path(self, index: int) -> Path:
        return block_path(self.directory, index)

    def put(self, index: int, tensors: Tensors) -> None:
        self._index[index] = write_block(self.directory, index, tensors)
        write_block_index(self.directory, self._index)

    def verify(self) -> None:
        """Check every block file against its recorded sha256 (a crash or a bad disk shows here)."""
        for index, entry in self._index.items():
            if sha256_file(self.path(index)) != entry["sha256"]:
                raise EngineError(f"{self.path(index)}: checksum mismatch with {self.directory / BLOCK_INDEX}")

    def _load(self, index: int) -> Tensors:
        pinned = self.device.type == "cuda"
        tensors = read_safetensors(self.path(index), pin=pinned)
        if self.device.type != "cpu":
            tensors = {k: v.to(self.device, non_blocking=pinned) for k, v in tensors.items()}
        return tensors

    def nbytes(self, index: int) -> int:
        return int(self._index[index]["bytes"])

    def __contains__(self, index: int) -> bool:
        return index in self._index


class CheckpointStore(BlockStore):
    """A float checkpoint's decoder blocks read from its own files on every fetch (a teacher streamed from disk):
    nothing is copied, and nothing is put."""

    tier = "disk"

    def __init__(self, source: CheckpointSource, prefix: str, n_blocks: int, device: torch.device | str = "cpu") -> None:
        super().__init__(device)
        self.source, self.prefix, self.n_blocks = source, prefix, n_blocks
        self._bytes: dict[int, int] = {}

    def put(self, index: int, tensors: Tensors) -> None:
        raise EngineError("a checkpoint store is read-only")

    def _load(self, index: int) -> Tensors:
        start = f"{self.prefix}.{index}."
        tensors = {name[len(start):]: self.source.read(name).to(self.device)
                   for name in self.source.names() if name.startswith(start)}
        self._bytes[index] = tensors_nbytes(tensors)
        return tensors

    def nbytes(self, index: int) -> int:
        return self._bytes.get(index, 0)

    def __contains__(self, index: int) -> bool:
        return 0 <= index < self.n_blocks


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
