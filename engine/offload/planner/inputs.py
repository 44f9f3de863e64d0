"""What the planner plans: a training run's model shapes, quantization, LoRA, batch and machine."""

from __future__ import annotations

from dataclasses import dataclass

from engine.errors import EngineError
from engine.offload.shapes import ModelShapes
from engine.offload.store import TIERS
from engine.quant.packing import SUPPORTED_BITS

DTYPE_BYTES = {"bfloat16": 2, "float32": 4}
TIER_CHOICES = ("auto", *TIERS)
DEVICES = ("cuda", "cpu")


@dataclass(frozen=True)
class PlanInputs:
    """A training run to plan: model shapes, quantization, LoRA, batch, machine."""

    shapes: ModelShapes
    bits: int
    rank: int
    seq_len: int
    batch: int
    device_mem: int
    host_mem: int
    group_size: int
    tier: str  # where the packed weights live: auto, device (resident), host or disk (streamed)
    prefetch: int
    compute_dtype: str
    optimizer_offload: str  # auto, yes, no
    device: str
    disk_gbps: float
    h2d_gbps: float
    tflops: float
    dequant_gweights: float  # dequantization rate, G weights/s
    tflops_source: str = "given"  # how each rate is known, for the plan's assumptions
    dequant_source: str = "given"
    workers: int = 1  # data-parallel processes on this node, each with ``batch`` and a device of its own

    def validate(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise EngineError(f"--bits must be one of {', '.join(map(str, SUPPORTED_BITS))}, got {self.bits}")
        if self.group_size == 0 or self.group_size < -1:
            raise EngineError(f"--group-size must be a positive integer or -1 (per row), got {self.group_size}")
        for name in ("rank", "seq_len", "batch"):
            if getattr(self, name) < 1:
                raise EngineError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.prefetch < 0:
            raise EngineError(f"--prefetch must be >= 0, got {self.prefetch}")
        for name in ("disk_gbps", "h2d_gbps", "tflops", "dequant_gweights"):
            if not getattr(self, name) > 0:
                raise EngineError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        choices = {"tier": TIER_CHOICES, "compute_dtype": tuple(DTYPE_BYTES), "device": DEVICES,
                   "optimizer_offload": ("auto", "yes", "no")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise EngineError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, "
                                  f"got {getattr(self, name)!r}")
        if self.device == "cpu" and self.device_mem != self.host_mem:
            raise EngineError("with --device cpu the device memory is host memory: give --host-mem only")

    @property
    def unified(self) -> bool:
        """Device and host are one memory: a CPU run, or a machine whose device shares host RAM."""
        return self.device == "cpu" or self.device_mem == self.host_mem

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len

    @property
    def act_bytes(self) -> int:
        return DTYPE_BYTES[self.compute_dtype]
