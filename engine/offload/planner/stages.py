"""Peak memory of the stages besides a finetune's training step: loading, quantizing (calibrated or not, in one
process or on Ray workers), correcting (LREC), evaluating and exporting, each as the parts it holds at its peak.

Every stage handles one decoder block at a time, so its peak is what stays for the whole run (the framework,
the tensors outside the blocks it keeps, the calibration windows' hidden states) plus one block's weights (float,
or, calibrating, as far as it is packed at the moment) plus the largest transient of the block's work.  Sizes are
exact from the shapes; the transients count the tensors the code holds at that moment (named with the code below),
and were checked against a 7B-shaped checkpoint (``bench/scale.py``, ``docs/scale.md``).

On a CPU every part is host memory.  On a GPU (``device`` cuda) the stage's computation and what it reads in for
it are device memory, as the commands place them (the block at work, the calibration windows' hidden states and
statistics, the quantizer's matrices, the activations, the model's float tensors, resident packed weights), beside
the CUDA runtime's assumed share; the host keeps the framework, what is staged on its way in (a block read from
the checkpoint, disk reads) and what is written out.  Ray calibration workers are planned on the command's device,
where they gather and sum the statistics and quantize the layers that fall to them; their driver, on its CPU, holds
no statistics.  The GPU figures are not measured (no GPU here).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from engine.errors import EngineError
from engine.offload.planner.inputs import DTYPE_BYTES
from engine.offload.planner.plan import Part
from engine.offload.planner.sizes import (
    ADAM_MOMENT_BYTES, CPU_DISK_STREAMING_BYTES, CUDA_RUNTIME_BYTES, FLOAT32, FRAMEWORK_HOST_BYTES,
    NORM_FLOAT32_COPIES, RECOMPUTE_FFN_COPIES, RECOMPUTE_HIDDEN_COPIES,
    cpu_step_overhead_bytes, dequant_transient_bytes, lora_params, packed_block_bytes, packed_linear_bytes,
)
from engine.offload.shapes import ModelShapes
from engine.options import format_size

STAGES = ("load", "quantize", "calibrate", "correct", "finetune", "eval", "export")
SOURCE_DTYPE_BYTES = {**DTYPE_BYTES, "float16": 2}
CALIB_BATCH = 8  # windows per calibration forward pass (engine.model.calibrate)
TRAIN_LOSS_TILE = 8192  # vocabulary entries per tile of the tiled losses (engine.train.losses)

# ---- Quantizing one layer (counts of float32 [out, in] matrices the quantizer holds at its peak) ---------------
# RTN (engine.quant.rtn): the float32 weight, the per-column scale and zero point, and two temporaries of the
# code computation.
RTN_WEIGHT_COPIES = 5
# OPTQ: the float32 weight and its act-order permutation (two while the permuted copy is made); at most two
# Hessian-sized matrices while the inverse's Cholesky factor is made (inverse_hessian_factor), one of them the layer's
# statistics, which calibration hands over to be made into the Hessian in place (LayerStats.take_hessian).
OPTQ_WEIGHT_COPIES = 2
OPTQ_HESSIAN_COPIES = 2
# QuIP#: the rotated weight divided by its scales, its rounding and the rounding error, in the statistics' dtype;
# the rotated Hessian (made in place of the layer's statistics, which calibration hands over; with padding, beside
# them until they are read: engine.quant.quip.rotated_hessian) and the LDL factor (solved into the Cholesky factor).
QUIP_WEIGHT_COPIES = 3
QUIP_HESSIAN_COPIES = 2
# GPTAQ's alignment (engine.model.sequential.aligned_weight): beside the group's statistics, the cross statistics
# of the layers not yet aligned (one becomes the layer's shift in place, then its LU factor takes its place), and
# the weight, its shift and the correction in the statistics' dtype.
ALIGN_WEIGHT_COPIES = 3
# One calibration forward pass of a block (CALIB_BATCH windows), without gradients, so a tensor is freed once the
# next is made from it.  At its widest, the MLP's product being made: SiLU(gate), up and the product ([T, ffn]) beside
# the residual stream, the norm's output and the attention's output ([T, hidden]), in the model's dtype (the
# attention's q, k, v and output come to fewer bytes at Llama's shapes); and the widest layer's input upcast to the
# statistics' dtype by the recording hook (twice with GPTAQ: the float twin's waits for the quantized block's).
CALIB_FORWARD_HIDDEN = 3
CALIB_FORWARD_FFN = 3
# Distillation: windows per forward (engine.train.distill.MICRO_WINDOWS), and float32 [T, vocab] tensors alive at
# its backward (logits, log-softmax, their gradients).
DISTILL_MICRO_WINDOWS = 4
DISTILL_LOGIT_COPIES = 4
# modulora calibrate's driver: what passing statistics between Ray workers in pieces inside its messages adds to
# its RSS (cluster/calibrate.py; measured between two actors: 1 to 4 GiB passed in calls of 1.5 to 6 MiB, 4 in
# flight, grew the driver by 175 to 250 MiB).
RAY_MESSAGE_BYTES = 256 << 20
# Writing a block file: the block's packed tensors, and safetensors' serialized copy of them.
WRITE_COPIES = 2
# Perplexity (engine.eval.perplexity): the model's float32 logits, their float64 copy and its log-softmax.
EVAL_LOGIT_BYTES = FLOAT32 + 2 * 8


@dataclass(frozen=True)
class StageInputs:
    """A stage to plan: the model's shapes and what the stage is run with."""

    shapes: ModelShapes
    stage: str
    method: str  # quantize / calibrate: the quantizer
    bits: int
    group_size: int
    source_dtype: str  # the float checkpoint's dtype (teacher, quantize source, merged export)
    compute_dtype: str
    calib_windows: int
    calib_seq_len: int
    asym: bool  # sequential calibration pulled towards the float model (GPTAQ): a float twin and cross statistics
    workers: int  # calibrate: Ray workers holding shards of the windows
    rank: int
    seq_len: int
    batch: int
    tier: str  # eval / correct: where the packed blocks live (disk streams them; anything else holds them)
    prefetch: int
    distill: bool = False  # quantize: the rounded model's continuous parameters then distilled (--distill-steps)
    distill_windows: int = 0  # the windows it trains on: their teacher log-probabilities are kept
    device: str = "cpu"  # where the stage computes: cpu (one memory) or cuda
    shard_windows: int | None = None  # calibration windows per statistics shard [engine.model.stats.SHARD_WINDOWS]

    @property
    def compute(self) -> str:
        """The memory that holds the stage's computation: the host on a CPU, else the device."""
        return "host" if self.device == "cpu" else "device"


@dataclass(frozen=True)
class StagePlan:
    """A stage's parts at its peak, and the peak of each memory of each process it runs in."""

    inputs: StageInputs
    parts: tuple[Part, ...]
    host_mem: int
    worker_parts: tuple[Part, ...] = ()  # calibrate: one Ray worker's parts (the driver's are ``parts``)
    device_mem: int | None = None  # one device's memory (a GPU stage)

    @property
    def host_peak(self) -> int:
        return _sum(self.parts, "host")

    @property
    def device_peak(self) -> int:
        """The device of the process that computes: the command's, or each Ray worker's."""
        return _sum(self.worker_parts or self.parts, "device")

    @property
    def worker_peak(self) -> int:
        """One Ray worker's host memory."""
        return _sum(self.worker_parts, "host")

    def overflows(self) -> dict[str, int]:
        """Bytes over each memory's size, for the memories that are over."""
        over = {"host memory": self.host_peak + self.inputs.workers * self.worker_peak - self.host_mem}
        if self.device_peak:
            over["device memory"] = self.device_peak - (self.device_mem or 0)
        return {name: value for name, value in over.items() if value > 0}

    @property
    def fits(self) -> bool:
        return not self.overflows()

    def verdict(self) -> str:
        if self.fits:
            return "fits"
        size = {"host memory": self.host_mem, "device memory": self.device_mem or 0}
        problems = []
        for name, over in self.overflows().items():
            where = "host" if name == "host memory" else "device"
            largest = sorted((p for p in (*self.parts, *self.worker_parts) if p.where == where),
                             key=lambda p: -p.nbytes)[:3]
            problems.append(f"{name} over by {format_size(over)} ({format_size(size[name] + over)} needed); "
                            f"largest: {', '.join(f'{p.name} {format_size(p.nbytes)}' for p in largest)}")
        return f"does not fit: {'; '.join(problems)}"

    def to_json(self) -> dict[str, Any]:
        i = self.inputs
        return {
            "stage": i.stage,
            "device": i.device,
            "parts": [vars(part) for part in self.parts],
            "host_peak_bytes": self.host_peak,
            **({"device_peak_bytes": self.device_peak} if i.device != "cpu" else {}),
            **({"worker_parts": [vars(p) for p in self.worker_parts], "worker_peak_bytes": self.worker_peak,
                "workers": i.workers} if self.worker_parts else {}),
            "fits": self.fits,
            "verdict": self.verdict(),
        }

    def render(self, title: str) -> str:
        rows = [("", self.parts)] + ([(f"each of {self.inputs.workers} workers: ", self.worker_parts)]
                                     if self.worker_parts else [])
        width = max(len(part.name) for part in (*self.parts, *self.worker_parts))
        lines = [f"{title}: {self.inputs.stage}"]
        for label, parts in rows:
            if label:
                lines.append(label.rstrip(": "))
            lines += [f"  {part.name:<{width}}  {format_size(part.nbytes):>10}  {part.where}" for part in parts]
        lines.append(f"peak {'host ' if self.device_peak else ''}memory {format_size(self.host_peak)}"
                     + (f" (driver), {format_size(self.worker_peak)} per worker" if self.worker_parts else ""))
        if self.device_peak:
            lines.append(f"peak device memory {format_size(self.device_peak)}"
                         + (" per worker" if self.worker_parts else "")
                         + f" of {format_size(self.device_mem or 0)} (CUDA runtime assumed, not measured)")
        lines.append(self.verdict())
        return "\n".join(lines)


def stage_plan(i: StageInputs, host_mem: int, device_mem: int | None = None) -> StagePlan:
    """The parts of ``i.stage`` at its peak (``finetune`` is planned by :func:`~engine.offload.planner.make_plan`)."""
    if i.stage not in STAGES or i.stage == "finetune":
        raise EngineError(f"stage {i.stage!r} is not planned here; stages: {', '.join(STAGES)}")
    if i.stage == "calibrate":
        return StagePlan(i, tuple(_ray_driver(i)), host_mem, tuple(_ray_worker(i)), device_mem)
    builders = {"load": _load, "quantize": _quantize, "correct": _correct, "eval": _eval, "export": _export}
    return StagePlan(i, tuple(builders[i.stage](i)), host_mem, device_mem=device_mem)


def _sum(parts: tuple[Part, ...], where: str) -> int:
    return sum(part.nbytes for part in parts if part.where == where)


# ---- the parts ----------------------------------------------------------------------------------------------------

def _framework() -> Part:
    return Part("runtime: framework (imports, kernels)", FRAMEWORK_HOST_BYTES, "host")


def _runtime(i: StageInputs) -> list[Part]:
    """The process's own memory: the framework on the host, and on a GPU the CUDA context and workspaces."""
    cuda = [Part("runtime: CUDA context and workspaces (assumed)", CUDA_RUNTIME_BYTES, "device")]
    return [_framework(), *(cuda if i.compute == "device" else [])]


def _staged_block(i: StageInputs) -> list[Part]:
    """On a GPU, a block read from the checkpoint passes through the host on its way to the device."""
    if i.compute == "host":
        return []
    return [Part(f"one block's float weights, read on the host ({i.source_dtype})", _block_float(i), "host")]


def _outside(i: StageInputs, note: str) -> Part:
    """The float tensors outside the blocks, in the source dtype."""
    nbytes = i.shapes.outside_params * SOURCE_DTYPE_BYTES[i.source_dtype]
    return Part(f"float tensors outside the blocks ({i.source_dtype}, {note})", nbytes, i.compute)


def _block_float(i: StageInputs) -> int:
    s = i.shapes
    return (s.linear_params_per_block + s.block_other_params) * SOURCE_DTYPE_BYTES[i.source_dtype]


def _written_block(i: StageInputs) -> Part:
    return Part("one block's packed weights, written", WRITE_COPIES * packed_block_bytes(i.shapes, i.bits,
                                                                                          i.group_size), "host")


def _largest_linear(s: ModelShapes) -> tuple[int, int]:
    return max(((out, inp) for _, out, inp in s.block_linears), key=lambda shape: shape[0] * shape[1])


def _groups(s: ModelShapes) -> list[list[tuple[int, int]]]:
    """The block's linears grouped by the input they are calibrated on, approximated as one group per parent
    module and input width (Llama: q, k, v and o; gate and up; down): statistics of a group are alive together."""
    groups: dict[tuple[str, int], list[tuple[int, int]]] = {}
    for name, out, inp in s.block_linears:
        groups.setdefault((name.rpartition(".")[0], inp), []).append((out, inp))
    return list(groups.values())


def _stats_bytes(i: StageInputs) -> int:
    """Statistics carry twice the activations' precision (engine.model.stats.stats_dtype)."""
    return 8 if i.source_dtype == "float32" else FLOAT32


def _quantizer_work(i: StageInputs, out: int, inp: int) -> int:
    """The quantizer's own tensors for one [out, inp] layer, beside the statistics."""
    stb = _stats_bytes(i)
    if i.method == "optq":
        return OPTQ_HESSIAN_COPIES * inp * inp * stb + OPTQ_WEIGHT_COPIES * out * inp * FLOAT32
    if i.method in ("quip", "qtip"):
        padded = _hadamard_width(inp)
        encoder = _trellis_encoder_bytes(out, i.bits) if i.method == "qtip" else 0
        return QUIP_HESSIAN_COPIES * padded * padded * stb + QUIP_WEIGHT_COPIES * out * padded * stb + encoder
    return RTN_WEIGHT_COPIES * out * inp * FLOAT32


def _declares(method: str, flag: str) -> bool:
    """Whether ``method``'s quantizer declares ``flag`` (``needs_calibration``: it needs calibration statistics;
    ``uses_up_statistics``: it makes its Hessian in place of a layer's)."""
    from engine.quant import QUANTIZERS

    return method in QUANTIZERS and getattr(QUANTIZERS[method], flag)


def _trellis_encoder_bytes(rows: int, bits: int) -> int:
    """QTIP's Viterbi pass over one block of 8 columns (``engine.quant.trellis.viterbi_encode``), all its rows'
    tiles at once: the pass's choices (uint8) and predecessors (int16) per step and state group, a few steps'
    squared errors against every state, and two rows of costs."""
    from engine.quant.qtip import TILE_ROWS, TILE_SYMBOLS
    from engine.quant.trellis import ERROR_STEPS, STATE_BITS

    states = 1 << STATE_BITS
    per_tile = TILE_SYMBOLS * (states >> bits) * 3 + (ERROR_STEPS + 2) * states * FLOAT32
    return -(-rows // TILE_ROWS) * per_tile


def _hadamard_width(n: int) -> int:
    from engine.quant.hadamard import padded_size

    return padded_size(n, 8)


def _group_stats(i: StageInputs, group: list[tuple[int, int]]) -> int:
    """The ``X^T X`` sums of ``group`` (layers calibrated on one input), in bytes."""
    return sum(inp * inp for _, inp in group) * _stats_bytes(i)


def _group_quantize(i: StageInputs, group: list[tuple[int, int]]) -> int:
    """The largest moment of quantizing ``group``: with GPTAQ, aligning each layer beside the group's statistics;
    then quantizing each layer beside the statistics still held.  A quantizer that uses up a layer's statistics as
    it quantizes it (OPTQ: its Hessian is made in their place, counted in its work) leaves only the later layers'
    held; another keeps the group's until the group is done."""
    stb, stats = _stats_bytes(i), _group_stats(i, group)
    best = 0
    for j, (out, inp) in enumerate(group):
        if i.asym:
            crosses = sum(n * n for _, n in group[j:]) * stb  # this layer's and the later layers' (GPTAQ)
            best = max(best, stats + crosses + ALIGN_WEIGHT_COPIES * out * inp * stb)
        held = sum(n * n for _, n in group[j + 1 :]) * stb if _declares(i.method, "uses_up_statistics") else stats
        best = max(best, held + _quantizer_work(i, out, inp))
    return best


def _calibrated_parts(i: StageInputs, windows: int, held: int) -> list[Part]:
    """What a holder of ``windows`` calibration windows that also quantizes keeps at its peak: the block's float twin
    (GPTAQ), the windows' hidden states, and the largest moment of the block's work, group of layers by group in
    block order: the group's statistics of ``held`` shards with a forward pass, or its quantizing, beside the block
    as it then is (the groups before it packed, each layer's float weights freed as it is swapped; the rest float),
    or, once every group is packed, the advancing hidden states.  The input embeddings are gone by then (released
    once the windows are embedded, a moment far below this one)."""
    s, a, c = i.shapes, SOURCE_DTYPE_BYTES[i.source_dtype], i.compute
    tokens, batch_tokens = windows * i.calib_seq_len, min(windows, CALIB_BATCH) * i.calib_seq_len
    carried = 2 if i.asym else 1  # the quantized model's states, and the float model's (GPTAQ)
    widest = max(inp for _, _, inp in s.block_linears)
    forward = (batch_tokens * (CALIB_FORWARD_HIDDEN * s.hidden_size + CALIB_FORWARD_FFN * s.intermediate_size) * a
               + carried * batch_tokens * widest * _stats_bytes(i))
    groups = _groups(s)
    floats = [sum(out * inp for out, inp in group) * a for group in groups]
    packed = [sum(packed_linear_bytes(out, inp, i.bits, i.group_size) for out, inp in group) for group in groups]
    norms = s.block_other_params * a
    shards = f", {held} shards'" if held > 1 else ""
    moments = []  # (the block as it then is, the work, the work's name)
    for g, group in enumerate(groups):
        block = sum(packed[:g]) + sum(floats[g:]) + norms
        stats = _group_stats(i, group) * carried * held + forward
        quantizing = _group_quantize(i, group)
        if stats > quantizing:
            moments.append((block, stats, f"statistics of the largest group{shards}, and a forward pass"))
        else:
            moments.append((block, quantizing, f"quantizing the largest group ({i.method})"))
    moments.append((sum(packed) + norms, tokens * s.hidden_size * a + forward,
                    "the advancing hidden states (the next block's input), and a forward pass"))
    block, work, name = max(moments, key=lambda moment: moment[0] + moment[1])
    return [*_runtime(i), *_staged_block(i),
            Part("the block at the peak (layers quantized before it packed, the rest float)", block, c),
            *([Part("the block's float twin (GPTAQ)", _block_float(i), c)] if i.asym else []),
            Part(f"hidden states of {windows} windows x {i.calib_seq_len} tokens ({carried} carried)",
                 carried * tokens * s.hidden_size * a, c),
            Part(name, work, c)]


def _worker_shards(i: StageInputs) -> tuple[list[int], list[int]]:
    """The windows and the shards each Ray worker holds: contiguous runs of whole shards
    (engine.model.stats.worker_spans)."""
    from engine.model.stats import SHARD_WINDOWS, worker_spans

    runs = worker_spans(i.calib_windows, i.shard_windows or SHARD_WINDOWS, i.workers)
    return [run[-1][1] - run[0][0] for run in runs], [len(run) for run in runs]


def _ray_driver(i: StageInputs) -> list[Part]:
    """``modulora calibrate``'s driver, on its CPU: it holds no statistics (they are summed and used on the
    workers); it reads each block to write it with the packed layers the workers send back, and the pieces of
    statistics passing between workers go through it inside Ray's messages; the tables outside the blocks are read
    at the end, once the last block is written and released, and written as they are (measured at 7B: the
    quantize's end holds them once), so the larger of the two moments is its peak."""
    blocks = [Part("one block's float weights (read to be written)", _block_float(i), "host"),
              Part("statistics passing between workers, in Ray's messages (measured)", RAY_MESSAGE_BYTES, "host"),
              _written_block(i)]
    outside = [_outside(replace(i, device="cpu"), "read at the end, to be written")]
    return [_framework(), *max(blocks, outside, key=lambda parts: sum(part.nbytes for part in parts))]


def _ray_worker(i: StageInputs) -> list[Part]:
    """One Ray worker: its windows' calibration as one process's, with its shards' statistics all alive (they
    wait for the sum of the workers before it), and the quantizing of the layers that fall to it."""
    windows, shards = _worker_shards(i)
    return _calibrated_parts(i, max(windows), max(shards))


def _quantize(i: StageInputs) -> list[Part]:
    if not _declares(i.method, "needs_calibration"):
        return [*_runtime(i), *_staged_block(i), Part("one block's float weights", _block_float(i), i.compute),
                Part(f"quantizing the largest layer ({i.method})", _quantizer_work(i, *_largest_linear(i.shapes)),
                     i.compute), _written_block(i)]
    from engine.model.stats import SHARD_WINDOWS

    shards = -(-i.calib_windows // (i.shard_windows or SHARD_WINDOWS))
    parts = _calibrated_parts(i, i.calib_windows, min(2, shards))  # the sum and one shard's statistics
    # A GPU run writes each block from the host, beside the device's peak; on a CPU the writing comes once the twin
    # and the statistics are gone, a moment below the peak.
    if i.compute == "device":
        parts.append(_written_block(i))
    if i.distill:  # after the blocks are written: the larger of the two phases is the stage's peak
        distill = _distill(i)
        return distill if sum(p.nbytes for p in distill) > sum(p.nbytes for p in parts) else parts
    return parts


def _distill(i: StageInputs) -> list[Part]:
    """Distillation (engine.train.distill): the packed model resident, its float tensors trained in float32 with
    Adam, the teacher's log-probabilities of every window, and one micro-batch's forward and backward (an
    estimate from the recompute constants, not measured)."""
    s = i.shapes
    tokens = DISTILL_MICRO_WINDOWS * i.calib_seq_len
    floats = s.outside_params + s.n_blocks * s.block_other_params
    activations = (s.n_blocks * tokens * (RECOMPUTE_HIDDEN_COPIES * s.hidden_size + RECOMPUTE_FFN_COPIES
                                          * s.intermediate_size) * FLOAT32 + DISTILL_LOGIT_COPIES * tokens
                   * s.vocab_size * FLOAT32)
    c = i.compute
    return [*_runtime(i),
            Part(f"packed decoder weights ({s.n_blocks} blocks)",
                 s.n_blocks * packed_block_bytes(s, i.bits, i.group_size), c),
            Part("float tensors trained: weights, gradients, Adam moments (float32)", 4 * floats * FLOAT32, c),
            Part(f"teacher log-probabilities ({i.distill_windows} windows, float16)",
                 i.distill_windows * i.calib_seq_len * s.vocab_size * 2, "host"),
            Part(f"forward and backward of {DISTILL_MICRO_WINDOWS} windows (estimate)", activations, c)]


def _packed_resident(i: StageInputs) -> list[Part]:
    """The packed decoder weights where the tier keeps them, and the blocks streamed from there in flight (on a
    GPU the host and disk tiers copy each block to the device; the disk's reads are staged on the host)."""
    s = i.shapes
    packed = packed_block_bytes(s, i.bits, i.group_size)
    streamed = i.tier == "disk" or (i.tier == "host" and i.compute == "device")
    home = {"disk": "disk", "host": "host"}.get(i.tier, i.compute)
    name = f"packed decoder weights ({s.n_blocks} blocks{', read in place' if i.tier == 'disk' else ''})"
    parts = [Part(name, s.n_blocks * packed, home)]
    if streamed:
        parts.append(Part(f"buffers: streamed blocks in flight ({2 + i.prefetch})", (2 + i.prefetch) * packed,
                          i.compute))
    if i.tier == "disk" and i.compute == "device":
        parts.append(Part("buffers: disk reads staged for the device", (2 + i.prefetch) * packed, "host"))
    if i.tier == "disk":
        parts.append(Part("runtime: disk streaming (prefetch thread, reads)", CPU_DISK_STREAMING_BYTES, "host"))
    return parts


def _float_params(i: StageInputs) -> list[Part]:
    """The quantized model's float tensors: norms in the blocks, and outside them all but the tables the disk tier
    reads in place."""
    s, b = i.shapes, SOURCE_DTYPE_BYTES[i.source_dtype]
    on_disk = s.disk_vocab_params if i.tier == "disk" else 0
    return [Part("float params outside the blocks", (s.outside_params - on_disk) * b, i.compute),
            Part("float params inside the blocks", s.n_blocks * s.block_other_params * b, i.compute)]


def _load(i: StageInputs) -> list[Part]:
    return [*_runtime(i), *_float_params(i), *_packed_resident(i)]


def _forward_block(i: StageInputs, tokens: int) -> int:
    """A block's forward without gradients at ``tokens`` tokens: the recompute's tensors and one dequantized tile,
    in the model's dtype (a quantized directory keeps its source's)."""
    s, a = i.shapes, SOURCE_DTYPE_BYTES[i.source_dtype]
    norms = (0 if i.source_dtype == "float32" else NORM_FLOAT32_COPIES["bfloat16"]) * tokens * s.hidden_size * FLOAT32
    return (tokens * (RECOMPUTE_HIDDEN_COPIES * s.hidden_size + RECOMPUTE_FFN_COPIES * s.intermediate_size) * a
            + norms + dequant_transient_bytes(s, i.device, i.source_dtype, tokens))


def _eval(i: StageInputs) -> list[Part]:
    s, tokens = i.shapes, i.batch * i.seq_len
    logits = tokens * s.vocab_size * EVAL_LOGIT_BYTES
    return [*_runtime(i), *_float_params(i), *_packed_resident(i),
            Part("activations: the larger of a block's forward and the logits", max(_forward_block(i, tokens), logits),
                 i.compute), *_cpu_scratch(i)]


def _cpu_scratch(i: StageInputs) -> list[Part]:
    """A CPU step's allocations beyond its tensors (on a GPU, part of the CUDA runtime's share)."""
    if i.compute != "host":
        return []
    return [Part("runtime: scratch beyond tensors", cpu_step_overhead_bytes(i.compute_dtype), "host")]


def _correct(i: StageInputs) -> list[Part]:
    """A finetune step of the student (LoRA on the streamed quantized blocks) beside the teacher's forward, whose
    blocks are read from its checkpoint; the KL over vocabulary tiles."""
    s, tokens, a = i.shapes, i.batch * i.seq_len, SOURCE_DTYPE_BYTES[i.source_dtype]
    params = lora_params(s, i.rank)
    teacher_block = _block_float(i)
    tiles = tokens * TRAIN_LOSS_TILE * FLOAT32 * 4  # teacher and student tiles, their softmaxes
    c = i.compute
    staged = ([Part(f"teacher: float blocks read on the host ({1 + i.prefetch})", (1 + i.prefetch) * teacher_block,
                    "host")] if c == "device" else [])
    return [*_runtime(i), *_float_params(i), *_packed_resident(i),
            Part("LoRA weights, gradients, Adam moments (float32)", params * (2 * FLOAT32 + ADAM_MOMENT_BYTES), c),
            Part(f"teacher: float blocks in flight ({2 + i.prefetch}, {i.source_dtype})", (2 + i.prefetch) * teacher_block,
                 c), *staged,
            Part("teacher: final hidden states", tokens * s.hidden_size * a, c),
            Part("activations: block checkpoints", s.n_blocks * tokens * s.hidden_size * a, c),
            Part("activations: a block's recompute, or the loss's vocabulary tiles",
                 max(_forward_block(i, tokens), tiles), c), *_cpu_scratch(i)]


def _export(i: StageInputs) -> list[Part]:
    """The merged model written one block at a time: each linear dequantized and merged with its adapter (on a GPU
    there: the block's packed weights and the merge on the device, the rest of the model and the writes on the
    host)."""
    s = i.shapes
    out, inp = _largest_linear(s)
    merged = (s.linear_params_per_block + s.block_other_params) * SOURCE_DTYPE_BYTES[i.compute_dtype]
    packed = packed_block_bytes(s, i.bits, i.group_size)
    on_device = [Part("one block's packed weights, on the device", packed, "device")] if i.compute == "device" else []
    return [*_runtime(i), *_float_params(replace(i, device="cpu")),
            Part("LoRA weights (float32)", lora_params(s, i.rank) * FLOAT32, "host"),
            Part("one block's packed weights", packed, "host"), *on_device,
            Part(f"one block merged ({i.compute_dtype}), and safetensors' serialized copy", WRITE_COPIES * merged,
                 "host"),
            Part("merging the largest layer (float32 dequantized weight and its LoRA product)",
                 2 * out * inp * FLOAT32, i.compute),
            Part("the vocabulary tables copied to the merged model",
                 s.disk_vocab_params * SOURCE_DTYPE_BYTES[i.compute_dtype], "host")]
