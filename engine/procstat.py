"""This process's memory and I/O from ``/proc`` (Linux): what the benchmarks and the planner's checks measure.

Peak RSS is the kernel's high-water mark (``VmHWM``), which can be reset to the
current RSS, so a measurement covers one phase (a training step) and not the
loading spike before it.  ``malloc_trim`` first hands freed heap pages back, so
the reset starts from what the process really holds.
"""

from __future__ import annotations

import ctypes
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


class PeakRss:
    """Peak resident memory of a phase, over the RSS when this object was made (the post-import baseline)."""

    def __init__(self) -> None:
        self.baseline = status_bytes("VmRSS")

    def reset(self) -> None:
        """Start a phase: trim the heap, then reset the high-water mark to the current RSS."""
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")

    def current(self) -> int:
        return status_bytes("VmRSS") - self.baseline

    def peak(self) -> int:
        """High-water mark since :meth:`reset`, over the baseline."""
        return status_bytes("VmHWM") - self.baseline
