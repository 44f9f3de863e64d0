"""Will a ModuLoRA finetuning run fit in memory, and how long will a step take?  Answered from shapes alone.

The plan lists every part of a training step's memory (packed decoder weights,
float parameters, LoRA weights and gradients, optimizer state, activations,
buffers), places each on the device, the host or the disk, and adds up the peak
of each memory.  Packed and parameter sizes are exact (the packed format's own
arithmetic); activations follow a model whose constants were measured (below).
Gradient checkpointing is assumed on: it is what makes large models fit.

On a CPU-only machine the "device" is host RAM: device and host are one memory,
and host-tier weights count against it like resident ones.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace
from typing import Any

from engine.errors import EngineError
from engine.lora.linear import DEFAULT_TILE_NUMEL
from engine.offload.shapes import ModelShapes
from engine.offload.store import TIERS
from engine.quant.packing import SUPPORTED_BITS, packed_length

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
DTYPE_BYTES = {"bfloat16": 2, "float32": 4}
FLOAT32 = 4  # LoRA weights and gradients, optimizer masters, loss buffers
SCALE_BYTES = 2  # group scales are float16
ADAM_MOMENT_BYTES = 2 * FLOAT32  # exp_avg and exp_avg_sq per trainable parameter

# ---- Activation model (gradient checkpointing on, Llama-style block: RMSNorm, attention, gated MLP) --------------
# Read off torch.profiler's live-tensor snapshot (profile_memory: every tensor alive, exact bytes) at the peak of a
# training step on this CPU, then checked on 9 shapes of 2 blocks with a 512-token vocabulary so the block dominates
# (hidden 512-2048, ffn 1376-5632, 512-2048 tokens): the whole plan is within 3.5% of the measured peak RSS in
# bfloat16, and 2-7% above it in float32.
# A block's activation peak is one of two moments of its backward, whichever is larger:
# * the end of its recompute, dequantizing down_proj: the recomputed forward's tensors (its Python locals included)
#   plus one dense tile and its unpacked codes;
# * the MLP's backward, right after that: fewer [T, hidden] tensors, three more [T, ffn] gradients.
# Counts are of [T, hidden] and [T, ffn] tensors in the compute dtype, T = batch x sequence length.
RECOMPUTE_HIDDEN_COPIES = 10  # output gradient, norm outputs, q, k, v, attention output, residual, down_proj output
RECOMPUTE_FFN_COPIES = 4  # gate, up, SiLU(gate), their product
BACKWARD_HIDDEN_COPIES = 7  # output gradient, norm outputs, q, k, v, attention output
BACKWARD_FFN_COPIES = 7  # gate, up, SiLU(gate), product, and the gradients flowing through them
# RMSNorm upcasts its input to float32 and saves that copy, twice per block; in float32 the "upcast" is the input
# itself (the block's checkpoint, the attention's residual sum), already counted.
NORM_FLOAT32_COPIES = {"bfloat16": 2, "float32": 0}
DEQUANT_TILE_EXTRA_BYTES = 1  # per weight of a tile, beyond its dense copy: the unpacked uint8 codes
# The loss, as the model computes it (``model(..., labels=...)``): the log-softmax output (saved), the NLL gradient
# and the log-softmax input gradient, all [T, vocab] float32 and alive together at the start of backward; 12.0 bytes
# per token per vocabulary entry in 3 measured shapes (vocabulary 16000 and 32000, bfloat16 and float32).  The
# trainer's tiled loss (engine.train.losses) holds far less, so for it this phase is an upper bound.  Loss and block
# peaks come one after the other, never together.
LOSS_FLOAT32_COPIES = 3
# CPU resident memory beyond live tensors during a step (oneDNN scratch, the autograd graph, small-object heap):
# measured RSS peak - exact tensor peak over 12 shapes: 17-33 MiB, mean 25 MiB, with glibc's mmap threshold fixed
# (MALLOC_MMAP_THRESHOLD_=131072; glibc's default moving threshold left 100 MB more in a fragmented heap here).
CPU_STEP_OVERHEAD_BYTES = 25 * MIB
# The disk tier's step beyond that and the blocks in flight: the prefetch thread's own malloc arena, the block kept
# over the forward/backward turn, the tables' row and tile reads.  Measured: 12 MiB over the rest of the plan on 8
# Llama blocks of hidden 1024 (tests/test_plan.py), where the resident step of the same shape is within 6%.
CPU_DISK_STREAMING_BYTES = 12 * MIB
# The process itself: torch, transformers and the engine imported, dequantization kernels compiled (measured RSS).
FRAMEWORK_HOST_BYTES = 530 * MIB
# Not measured (no GPU here): CUDA context, cuBLAS workspaces and allocator fragmentation, a common rule of thumb.
CUDA_RUNTIME_BYTES = 1 * GIB

# ---- Time model -----------------------------------------------------------------------------------------------
HOST_ADAM_GPARAMS = 0.6  # torch AdamW (foreach=False) on 147M float32 params, 2 threads of this CPU: 0.6 G params/s
# Not measured (no GPU here): Adam reads and writes ~28 bytes per parameter; at ~1.5 TB/s that is ~50 G params/s.
DEVICE_ADAM_GPARAMS = 50.0

UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": KIB, "mib": MIB, "gib": GIB, "tib": 1 << 40}
TIER_CHOICES = ("auto", *TIERS)
DEVICES = ("cuda", "cpu")


def parse_size(text: str, option: str) -> int:
    """Bytes from ``24GiB``, ``64GB``, ``512MiB``, ``1.5 TiB`` or a plain byte count."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match and UNITS.get(match.group(2).lower())
    if not unit:
        raise EngineError(f"{option}: cannot read {text!r} as a size (examples: 24GiB, 64GB, 512MiB, 1000000)")
    return int(float(match.group(1)) * unit)


def format_size(nbytes: float) -> str:
    if nbytes >= 1000 * MIB:
        return f"{nbytes / GIB:.2f} GiB"
    return f"{nbytes / MIB:.1f} MiB" if nbytes >= MIB else f"{nbytes / KIB:.1f} KiB"


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
    group_size: int = 64
    tier: str = "auto"  # where the packed weights live: auto, device (resident), host or disk (streamed)
    prefetch: int = 1
    compute_dtype: str = "bfloat16"
    optimizer_offload: str = "auto"  # auto, yes, no
    device: str = "cuda"
    disk_gbps: float = 1.0
    h2d_gbps: float = 25.0
    tflops: float = 150.0
    dequant_gweights: float = 50.0  # dequantization rate, G weights/s

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


@dataclass(frozen=True)
class Part:
    """One line of the plan: what it is, its bytes, and which memory holds it."""

    name: str
    nbytes: int
    where: str  # device, host or disk


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

    def _total(self, places: tuple[str, ...]) -> int:
        return sum(part.nbytes for part in self.parts if part.where in places)

    @property
    def device_peak(self) -> int:
        return self._total(("device", "host") if self.inputs.unified else ("device",))

    @property
    def host_peak(self) -> int:
        return self._total(("device", "host") if self.inputs.unified else ("host",))

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
        changes = fixes(self.inputs)
        if changes:
            advice = f"each of these fits: {', '.join(changes)}"
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
            f"matmuls at {i.tflops:g} TFLOP/s; dequantization at {i.dequant_gweights:g} G weights/s; "
            f"disk {i.disk_gbps:g} GB/s; host-to-device " + ("free" if i.device == "cpu" else f"{i.h2d_gbps:g} GB/s"),
            f"Adam at {HOST_ADAM_GPARAMS:g} G params/s on the host (measured, 2 CPU threads), "
            f"{DEVICE_ADAM_GPARAMS:g} G params/s on a GPU (assumed)",
            "activation constants measured on a CPU with Llama blocks and SDPA attention (no [seq, seq] scores)",
        ]
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


# ---- sizes ------------------------------------------------------------------------------------------------------

def packed_linear_bytes(out_features: int, in_features: int, bits: int, group_size: int) -> int:
    """Asymmetric group-wise format: packed codes per row, float16 scales, one packed stream of zero points."""
    n_groups = -(-in_features // (in_features if group_size == -1 else group_size))
    codes = out_features * packed_length(in_features, bits)
    scales = out_features * n_groups * SCALE_BYTES
    zeros = packed_length(out_features * n_groups, bits)
    return codes + scales + zeros


def packed_block_bytes(shapes: ModelShapes, bits: int, group_size: int) -> int:
    return sum(packed_linear_bytes(out, inp, bits, group_size) for _, out, inp in shapes.block_linears)


def lora_params(shapes: ModelShapes, rank: int) -> int:
    """``A`` [r, in] and ``B`` [out, r] on every decoder linear."""
    return shapes.n_blocks * sum(rank * (out + inp) for _, out, inp in shapes.block_linears)


def dequant_tile_numel(shapes: ModelShapes) -> int:
    return min(DEFAULT_TILE_NUMEL, max(out * inp for _, out, inp in shapes.block_linears))


def activation_phases(i: PlanInputs) -> dict[str, int]:
    """Bytes of the step's activations: the checkpoints (one block input each, held until that block's backward),
    and the transient peaks, which come one after the other: the loss, then each block's recompute and backward."""
    s, a, t = i.shapes, i.act_bytes, i.tokens
    h, f = s.hidden_size, s.intermediate_size
    norms = NORM_FLOAT32_COPIES[i.compute_dtype] * t * h * FLOAT32
    tile = dequant_tile_numel(s) * (a + DEQUANT_TILE_EXTRA_BYTES)
    return {
        "checkpoints": s.n_blocks * t * h * a,
        "loss": LOSS_FLOAT32_COPIES * FLOAT32 * t * s.vocab_size,
        "block_recompute": t * (RECOMPUTE_HIDDEN_COPIES * h + RECOMPUTE_FFN_COPIES * f) * a + norms + tile,
        "block_backward": t * (BACKWARD_HIDDEN_COPIES * h + BACKWARD_FFN_COPIES * f) * a + norms,
    }


# ---- time -------------------------------------------------------------------------------------------------------

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


# ---- placement --------------------------------------------------------------------------------------------------

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
        parts.append(Part("runtime: step scratch beyond tensors", CPU_STEP_OVERHEAD_BYTES, "device"))
        if tier == "disk":
            parts.append(Part("runtime: disk streaming (prefetch thread, reads)", CPU_DISK_STREAMING_BYTES, "device"))
    else:
        parts.append(Part("runtime: CUDA context and workspaces", CUDA_RUNTIME_BYTES, "device"))
    parts.append(Part("runtime: framework (imports, kernels)", FRAMEWORK_HOST_BYTES, "host"))
    return Plan(i, tier, optimizer_offloaded, tuple(parts), step_time(i, tier, optimizer_offloaded), phases)


def make_plan(i: PlanInputs) -> Plan:
    """The first placement that fits, in order of speed: weights resident, then on the host, then on disk; for
    each, optimizer state on the device, then on the host.  If none fits, the one that misses by least."""
    i.validate()
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
        if option not in found and make_plan(trial).fits:
            found[option] = label
    return list(found.values())


def halvings(n: int, smallest: int) -> list[int]:
    """``n // 2``, ``n // 4``, ... down to ``smallest``."""
    out = []
    while n // 2 >= smallest:
        n //= 2
        out.append(n)
    return out
