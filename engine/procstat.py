"""This process's memory and I/O from ``/proc`` (Linux): what the benchmarks and the planner's checks measure.

Peak RSS is the kernel's high-water mark (``VmHWM``), which can be reset to the
current RSS, so a measurement covers one phase (a training step) and not the
loading spike before it.  ``malloc_trim`` first hands freed heap pages back, so
the reset starts from what the process really holds.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path


def status_bytes(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def disk_read_bytes() -> int:
    """Bytes this process has caused to be read from storage (page-cache hits excluded)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    raise RuntimeError("read_bytes not in /proc/self/io")


_LIBC = ctypes.CDLL(None)  # the C library the process already uses


def release_free_heap() -> None:
    """Hand the heap's free pages back to the kernel (glibc's ``malloc_trim``; a no-op where there is none).

    glibc keeps freed memory for reuse, raising its thresholds as large buffers come and go, so a process that
    allocates and frees many tensors holds far more than it uses; trimming makes RSS follow the live tensors again.
    """
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is not None:
        trim(0)


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD_BYTES = 128 << 10  # glibc's initial value


def keep_heap_bounded() -> None:
    """Fix glibc's mmap threshold at its initial 128 KiB, so every tensor-sized buffer is its own mapping, returned
    to the kernel when freed: RSS then follows the live tensors.

    By default glibc raises the threshold to the size of each large buffer freed (up to 32 MiB) and serves later
    ones from a heap it seldom returns; quantizing a 7B model one block at a time then peaked at 3.34 GiB instead
    of 2.33 GiB here.  A threshold the user set (``MALLOC_MMAP_THRESHOLD_``) is left alone; no-op off glibc.
    """
    mallopt = getattr(_LIBC, "mallopt", None)
    if mallopt is not None and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


class PeakRss:
    """Peak resident memory of a phase, over the RSS when this object was made (the post-import baseline)."""

    def __init__(self) -> None:
        self.baseline = status_bytes("VmRSS")

    def reset(self) -> None:
        """Start a phase: trim the heap, then reset the high-water mark to the current RSS."""
        release_free_heap()
        Path("/proc/self/clear_refs").write_text("5")

    def current(self) -> int:
        return status_bytes("VmRSS") - self.baseline

    def peak(self) -> int:
        """High-water mark since :meth:`reset`, over the baseline."""
        return status_bytes("VmHWM") - self.baseline
