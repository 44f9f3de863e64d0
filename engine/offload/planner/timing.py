"""The time model: seconds per training step from FLOP, dequantization and bandwidth rates."""

from __future__ import annotations

from dataclasses import dataclass

from engine.offload.planner.inputs import PlanInputs
from engine.offload.planner.sizes import FLOAT32, lora_params, packed_block_bytes

# ---- Time model -----------------------------------------------------------------------------------------------
HOST_ADAM_GPARAMS = 0.6  # torch AdamW (foreach=False) on 147M float32 params, 2 threads of this CPU: 0.6 G params/s
# Not measured (no GPU here): Adam reads and writes ~28 bytes per parameter; at ~1.5 TB/s that is ~50 G params/s.
DEVICE_ADAM_GPARAMS = 50.0
# Matmul rates when none is given, TFLOP/s: this 2-core CPU's, measured (float32 ~170 GFLOP/s, bf16 ~350);
# on CUDA an assumption for a 24 GB-class card (an H200 runs bf16 at ~790).
CPU_TFLOPS = {"float32": 0.17, "bfloat16": 0.35}
CUDA_TFLOPS = 150.0


def default_tflops(device: str, compute_dtype: str) -> tuple[float, str]:
    """(TFLOP/s, how it is known) for matmuls on ``device`` in ``compute_dtype``."""
    if device == "cpu":
        return CPU_TFLOPS[compute_dtype], "this 2-core CPU's, measured"
    return CUDA_TFLOPS, "assumed for a 24 GB-class GPU, not measured"


@dataclass(frozen=True)
class StepTime:
    """Seconds per training step, from FLOP, dequantization and bandwidth rates."""

    compute_s: float
    dequant_s: float
    io_s: float
    optimizer_s: float
    overlapped: bool  # prefetch >= 1: block I/O runs while the previous block computes

    @property
    def step_s(self) -> float:
        work = self.compute_s + self.dequant_s
        return (max(work, self.io_s) if self.overlapped else work + self.io_s) + self.optimizer_s

    @property
    def floor_s(self) -> float:
        """No step can be faster than its I/O or its matmuls."""
        return max(self.io_s, self.compute_s)


def step_time(i: PlanInputs, tier: str, optimizer_offloaded: bool) -> StepTime:
    """Frozen quantized base with checkpointing: decoder matmuls run 3 times (forward, recompute, input gradient);
    attention's 4 (its backward needs gradients of both operands); lm_head's 2 (not recomputed); LoRA's 4."""
    s, t = i.shapes, i.tokens
    decoder = 2 * t * s.n_blocks * s.linear_params_per_block
    attention = 4 * i.batch * i.seq_len**2 * s.hidden_size * s.n_blocks
    head = 2 * t * s.vocab_size * s.hidden_size
    lora = 2 * t * lora_params(s, i.rank)
    flops = 3 * decoder + 4 * attention + 2 * head + 4 * lora
    dequant_weights = 3 * s.n_blocks * s.linear_params_per_block
    packed = s.n_blocks * packed_block_bytes(s, i.bits, i.group_size)
    bandwidth = {"disk": i.disk_gbps, "host": None if i.device == "cpu" else i.h2d_gbps}.get(tier)
    io = 2 * packed / (bandwidth * 1e9) if bandwidth else 0.0
    params = lora_params(s, i.rank)
    on_host = optimizer_offloaded or i.device == "cpu"
    optimizer = params / ((HOST_ADAM_GPARAMS if on_host else DEVICE_ADAM_GPARAMS) * 1e9)
    if optimizer_offloaded and i.device != "cpu":
        optimizer += 2 * FLOAT32 * params / (i.h2d_gbps * 1e9)  # gradients down, updated weights back up
    return StepTime(compute_s=flops / (i.tflops * 1e12), dequant_s=dequant_weights / (i.dequant_gweights * 1e9),
                    io_s=io, optimizer_s=optimizer, overlapped=i.prefetch >= 1)
