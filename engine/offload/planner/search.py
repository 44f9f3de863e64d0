"""Where a run's parts go: every placement of the packed weights (device, host, disk) and the optimizer state
(device, host), the fastest that fits, and single changes that would make a run fit."""

from __future__ import annotations

from dataclasses import replace

from engine.offload.planner.inputs import PlanInputs
from engine.offload.planner.plan import Part, Plan
from engine.offload.planner.sizes import (
    ADAM_MOMENT_BYTES, CPU_DISK_STREAMING_BYTES, CUDA_RUNTIME_BYTES, FLOAT32, FRAMEWORK_HOST_BYTES,
    activation_phases, cpu_step_overhead_bytes, lora_params, packed_block_bytes,
)
from engine.offload.planner.timing import step_time
from engine.offload.store import TIERS
from engine.quant.packing import SUPPORTED_BITS

def build_plan(i: PlanInputs, tier: str, optimizer_offloaded: bool) -> Plan:
    """The parts of one placement: packed weights on ``tier``, optimizer state on the host or the device."""
    s, a = i.shapes, i.act_bytes
    block = packed_block_bytes(s, i.bits, i.group_size)
    params = lora_params(s, i.rank)
    phases = activation_phases(i)
    opt_where = "host" if optimizer_offloaded else "device"
    on_disk = s.disk_vocab_params if tier == "disk" else 0
    parts = [
        Part(f"packed decoder weights ({s.n_blocks} blocks)", s.n_blocks * block, tier),
        Part(f"float params outside the blocks ({i.compute_dtype})", (s.outside_params - on_disk) * a, "device"),
        Part(f"float params inside the blocks ({i.compute_dtype})", s.n_blocks * s.block_other_params * a, "device"),
        Part("LoRA weights (float32)", params * FLOAT32, "device"),
        Part("LoRA gradients (float32)", params * FLOAT32, "device"),
        Part("optimizer: Adam moments", params * ADAM_MOMENT_BYTES, opt_where),
    ]
    if on_disk:
        parts.append(Part(f"input embeddings and output head, read by rows ({i.compute_dtype})", on_disk * a, "disk"))
    if optimizer_offloaded:
        parts.append(Part("optimizer: float32 masters + gradient buffers", params * 2 * FLOAT32, "host"))
    transient = max(("loss", "logits + loss"), ("block_recompute", "one block's recompute, dequantizing"),
                    ("block_backward", "one block's backward"), key=lambda phase: phases[phase[0]])
    parts += [
        Part("activations: block checkpoints", phases["checkpoints"], "device"),
        Part(f"activations: peak of {transient[1]}", phases[transient[0]], "device"),
    ]
    copies_blocks = tier == "disk" or (tier == "host" and i.device != "cpu")  # a CPU host store hands out its own
    if copies_blocks:
        parts.append(Part(f"buffers: streamed blocks in flight ({2 + i.prefetch})", (2 + i.prefetch) * block, "device"))
    if tier == "disk" and i.device != "cpu":
        parts.append(Part("buffers: disk reads staged for the device", (2 + i.prefetch) * block, "host"))
    if i.device == "cpu":
        parts.append(Part("runtime: step scratch beyond tensors", cpu_step_overhead_bytes(i.compute_dtype), "device"))
        if tier == "disk":
            parts.append(Part("runtime: disk streaming (prefetch thread, reads)", CPU_DISK_STREAMING_BYTES, "device"))
    else:
        parts.append(Part("runtime: CUDA context and workspaces", CUDA_RUNTIME_BYTES, "device"))
    parts.append(Part("runtime: framework (imports, kernels)", FRAMEWORK_HOST_BYTES, "host"))
    return Plan(i, tier, optimizer_offloaded, tuple(parts), step_time(i, tier, optimizer_offloaded), phases)


def make_plan(i: PlanInputs) -> Plan:
    """The first placement that fits, in order of speed: weights resident, then on the host, then on disk; for
    each, optimizer state on the device, then on the host.  If none fits, the one that misses by least, with
    the single changes that would fit."""
    i.validate()
    plan = best_placement(i)
    return plan if plan.fits else replace(plan, fixes=tuple(fixes(i)))


def best_placement(i: PlanInputs) -> Plan:
    tiers = TIERS if i.tier == "auto" else (i.tier,)
    offloads = {"auto": (False, True), "yes": (True,), "no": (False,)}[i.optimizer_offload]
    candidates = [build_plan(i, tier, offloaded) for tier in tiers for offloaded in offloads]
    fitting = [plan for plan in candidates if plan.fits]
    return fitting[0] if fitting else min(candidates, key=lambda plan: sum(plan.overflows().values()))


def fixes(i: PlanInputs) -> list[str]:
    """Single changes of the inputs that make the run fit (the largest batch, sequence length, rank and bits
    that do)."""
    trials: list[tuple[str, PlanInputs]] = []
    if i.tier != "auto":
        trials.append(("--tier auto", replace(i, tier="auto")))
    if i.optimizer_offload != "auto":
        trials.append(("--optimizer-offload auto", replace(i, optimizer_offload="auto")))
    trials += [(f"--batch {b}", replace(i, batch=b)) for b in halvings(i.batch, 1)]
    trials += [(f"--seq-len {n}", replace(i, seq_len=n)) for n in halvings(i.seq_len, 64)]
    trials += [(f"--rank {r}", replace(i, rank=r)) for r in halvings(i.rank, 1)]
    trials += [(f"--bits {b}", replace(i, bits=b)) for b in sorted(SUPPORTED_BITS, reverse=True) if b < i.bits]
    found: dict[str, str] = {}
    for label, trial in trials:
        option = label.split()[0]
        if option not in found and best_placement(trial).fits:
            found[option] = label
    return list(found.values())


def halvings(n: int, smallest: int) -> list[int]:
    """``n // 2``, ``n // 4``, ... down to ``smallest``."""
    out = []
    while n // 2 >= smallest:
        n //= 2
        out.append(n)
    return out
