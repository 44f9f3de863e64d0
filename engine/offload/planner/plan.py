"""A plan: the parts of a training step's memory placed on device, host or disk, the peaks they add up to,
the step time, and the verdict with what would fit instead."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from engine.offload.planner.inputs import PlanInputs
from engine.offload.planner.sizes import CUDA_RUNTIME_BYTES
from engine.offload.planner.timing import DEVICE_ADAM_GPARAMS, HOST_ADAM_GPARAMS, StepTime
from engine.options import format_size


@dataclass(frozen=True)
class Part:
    """One line of the plan: what it is, its bytes, and which memory holds it."""

    name: str
    nbytes: int
    where: str  # device, host or disk


@dataclass(frozen=True)
class Plan:
    """One placement of a run's parts, with the peaks it gives each memory and the step time it costs.

    The parts add up to the peaks: on a CPU (unified memory) everything but the disk counts once, in the one
    memory; otherwise the device peak is the device's parts and the host peak the host's.
    """

    inputs: PlanInputs
    tier: str
    optimizer_offloaded: bool
    parts: tuple[Part, ...]
    time: StepTime
    activation_phases: dict[str, int]
    fixes: tuple[str, ...] = ()  # single changes of the inputs that would fit, found for a plan that does not

    def _total(self, places: tuple[str, ...]) -> int:
        return sum(part.nbytes for part in self.parts if part.where in places)

    @property
    def device_peak(self) -> int:
        """One worker's device; on a CPU the device is the host memory, which every worker on the node shares."""
        if self.inputs.unified:
            return self.host_peak
        return self._total(("device",))

    @property
    def host_peak(self) -> int:
        """The node's host memory: every data-parallel worker on it holds its own parts."""
        return self.inputs.workers * self._total(("device", "host") if self.inputs.unified else ("host",))

    def overflows(self) -> dict[str, int]:
        """Bytes over each memory's size, for the memories that are over."""
        if self.inputs.unified:
            limit = min(self.inputs.device_mem, self.inputs.host_mem)
            over = {"memory": self.device_peak - limit}
        else:
            over = {"device memory": self.device_peak - self.inputs.device_mem,
                    "host memory": self.host_peak - self.inputs.host_mem}
        return {name: value for name, value in over.items() if value > 0}

    @property
    def fits(self) -> bool:
        return not self.overflows()

    def verdict(self) -> str:
        """``fits``, or which memory is short, by how much, and single changes that would fit."""
        if self.fits:
            return "fits"
        needed = {"memory": self.device_peak, "device memory": self.device_peak, "host memory": self.host_peak}
        problems = [f"{name} over by {format_size(over)} ({format_size(needed[name])} needed)"
                    for name, over in self.overflows().items()]
        if self.fixes:
            advice = f"each of these fits: {', '.join(self.fixes)}"
        else:
            places = {"memory": ("device", "host"), "device memory": ("device",), "host memory": ("host",)}
            short = {where for name in self.overflows() for where in places[name]}
            largest = sorted((p for p in self.parts if p.where in short), key=lambda p: -p.nbytes)[:3]
            advice = ("no single change of tier, optimizer offload, batch, sequence length, rank or bits makes it "
                      f"fit; largest there: {', '.join(f'{p.name} {format_size(p.nbytes)}' for p in largest)}")
        return f"does not fit: {'; '.join(problems)}; {advice}"

    def assumptions(self) -> list[str]:
        i = self.inputs
        lines = [
            f"device {i.device}" + (" (device and host are one memory)" if i.unified else "")
            + f"; compute and float params in {i.compute_dtype}; LoRA, its gradients and Adam state in float32",
            f"gradient checkpointing on (each block recomputed in backward); prefetch {i.prefetch} block(s)",
            f"matmuls at {i.tflops:g} TFLOP/s ({i.tflops_source})",
            f"dequantization at {i.dequant_gweights:g} G weights/s ({i.dequant_source})",
            f"disk {i.disk_gbps:g} GB/s; host-to-device " + ("free" if i.device == "cpu" else f"{i.h2d_gbps:g} GB/s"),
            f"Adam at {HOST_ADAM_GPARAMS:g} G params/s on the host (measured, 2 CPU threads), "
            f"{DEVICE_ADAM_GPARAMS:g} G params/s on a GPU (assumed)",
            "activation constants measured on a CPU with Llama blocks and SDPA attention (no [seq, seq] scores)",
        ]
        if i.workers > 1:
            lines.append(f"{i.workers} data-parallel workers on this node, each with batch {i.batch}; host memory "
                         "holds all of them; the step time is one worker's (plus its gradient all-reduce)")
        if i.device == "cpu":
            lines.append("live memory; set MALLOC_MMAP_THRESHOLD_=131072, else glibc's heap keeps more (100 MB here)")
        else:
            lines.append(f"CUDA context and workspaces: {format_size(CUDA_RUNTIME_BYTES)} (assumed, not measured)")
        return lines

    def to_json(self) -> dict[str, Any]:
        inputs = {k: v for k, v in asdict(self.inputs).items() if k != "shapes"}
        t = self.time
        return {
            "inputs": inputs,
            "tier": self.tier,
            "optimizer_offloaded": self.optimizer_offloaded,
            "parts": [asdict(part) for part in self.parts],
            "activation_phases": self.activation_phases,
            "device_peak_bytes": self.device_peak,
            "host_peak_bytes": self.host_peak,
            "fits": self.fits,
            "verdict": self.verdict(),
            "time": {"step_s": t.step_s, "floor_s": t.floor_s, "compute_s": t.compute_s, "dequant_s": t.dequant_s,
                     "io_s": t.io_s, "optimizer_s": t.optimizer_s, "overlapped": t.overlapped},
            "assumptions": self.assumptions(),
        }

    def render(self, title: str) -> str:
        i, t = self.inputs, self.time
        width = max(len(part.name) for part in self.parts)
        lines = [f"{title}: {i.bits}-bit g{i.group_size}, LoRA r={i.rank}, batch {i.batch} x {i.seq_len} tokens, "
                 f"weights on {self.tier}, optimizer state on {'host' if self.optimizer_offloaded else 'device'}",
                 f"{'part':<{width}}  {'bytes':>10}  where"]
        lines += [f"{part.name:<{width}}  {format_size(part.nbytes):>10}  {part.where}" for part in self.parts]
        lines.append(f"peak device memory {format_size(self.device_peak)} of {format_size(i.device_mem)}")
        lines.append(f"peak host memory   {format_size(self.host_peak)} of {format_size(i.host_mem)}")
        lines.append(self.verdict())
        join = "max" if t.overlapped else "sum"
        lines.append(f"step time ~{t.step_s:.2f} s = {join}(compute {t.compute_s:.2f} s + dequantization "
                     f"{t.dequant_s:.2f} s, I/O {t.io_s:.2f} s) + optimizer {t.optimizer_s:.2f} s; "
                     f"floor max(I/O, compute) {t.floor_s:.2f} s")
        lines += [f"assuming {line}" for line in self.assumptions()]
        return "\n".join(lines)
