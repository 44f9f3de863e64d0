"""The memory model: exact packed and parameter sizes, and activations from constants measured here."""

from __future__ import annotations

import torch

from engine.lora.function import matmul_dtype
from engine.lora.linear import tile_numel_for
from engine.offload.planner.inputs import PlanInputs
from engine.offload.shapes import ModelShapes
from engine.quant.packing import packed_length

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
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
# One [T, vocab] float32 buffer of that loss is still held while the last block runs its backward, on top of the
# block's own peak, and is gone by the next block (torch.profiler's live tensors, transformers 5.24, vocabulary
# 4000, T = 512: that block's peak 8.4 MiB above every later one, with the head in memory and on the disk tier alike).
# The LoRA gradients, counted whole among the parts, grow during the backward: at the last block only its own exist,
# so the residue adds only what exceeds the gradients still to come.
LOSS_RESIDUE_FLOAT32_COPIES = 1
# CPU resident memory beyond live tensors during a step (oneDNN scratch, the autograd graph, small-object heap),
# with glibc's mmap threshold fixed (MALLOC_MMAP_THRESHOLD_=131072; glibc's default moving threshold left 100 MB
# more in a fragmented heap).  It depends on how half precision multiplies (engine.lora.function.matmul_dtype):
# oneDNN's own bfloat16 GEMMs (an AVX512-BF16 CPU) keep reordered operand buffers, 31-34 MiB over
# tests/test_plan.py's shapes; where half precision is upcast to float32 (an AVX2 CPU, and float32 models) the
# upcast operands are counted as tensors and the rest measured 16-24 MiB (torch 2.13, transformers 5.24, CI's AVX2
# machine and this AVX512 one with the upcast forced).
CPU_STEP_OVERHEAD_BYTES = {"onednn half": 34 * MIB, "float32": 20 * MIB}
# The disk tier's step beyond that and the blocks in flight: the prefetch thread's own malloc arena, the tables' row
# and tile reads.  Measured on 8 Llama blocks of hidden 1024 (tests/test_plan.py): the disk step's peak RSS less the
# resident step's, less the packed weights and tables the disk tier does not hold and its blocks in flight, 4.0 MiB.
CPU_DISK_STREAMING_BYTES = 4 * MIB
# The process itself: torch, transformers and the engine imported, dequantization kernels compiled (measured RSS).
FRAMEWORK_HOST_BYTES = 530 * MIB
# Not measured (no GPU here): CUDA context, cuBLAS workspaces and allocator fragmentation, a common rule of thumb.
CUDA_RUNTIME_BYTES = 1 * GIB


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


def cpu_step_overhead_bytes(dtype: str) -> int:
    """:data:`CPU_STEP_OVERHEAD_BYTES` for a CPU computing in ``dtype``."""
    half_gemm = matmul_dtype(getattr(torch, dtype), torch.device("cpu")) in (torch.bfloat16, torch.float16)
    return CPU_STEP_OVERHEAD_BYTES["onednn half" if half_gemm else "float32"]


def dequant_tile_numel(shapes: ModelShapes, device: str = "cpu") -> int:
    """The largest dequantized tile a layer makes on ``device`` (``engine.lora.linear.TILE_NUMEL``)."""
    return min(tile_numel_for(device), max(out * inp for _, out, inp in shapes.block_linears))


def dequant_transient_bytes(shapes: ModelShapes, device: str, dtype: str, tokens: int) -> int:
    """A layer's transient operands: one dequantized tile and its unpacked codes.  Where half precision multiplies
    in float32 (``engine.lora.function.matmul_dtype``: a CPU without half-precision GEMMs) the tile is float32
    and the layer's input is upcast too, down_proj's [T, ffn] the widest."""
    compute = getattr(torch, dtype)
    mm_dtype = matmul_dtype(compute, torch.device(device))
    upcast = mm_dtype.itemsize * tokens * shapes.intermediate_size if mm_dtype != compute else 0
    return dequant_tile_numel(shapes, device) * (mm_dtype.itemsize + DEQUANT_TILE_EXTRA_BYTES) + upcast


def activation_phases(i: PlanInputs) -> dict[str, int]:
    """Bytes of the step's activations: the checkpoints (one block input each, held until that block's backward),
    and the transient peaks, which come one after the other: the loss, then each block's recompute and backward."""
    s, a, t = i.shapes, i.act_bytes, i.tokens
    later_gradients = (s.n_blocks - 1) * lora_params(s, i.rank) // s.n_blocks * FLOAT32
    residue = max(0, LOSS_RESIDUE_FLOAT32_COPIES * FLOAT32 * t * s.vocab_size - later_gradients)
    h, f = s.hidden_size, s.intermediate_size
    norms = NORM_FLOAT32_COPIES[i.compute_dtype] * t * h * FLOAT32
    tile = dequant_transient_bytes(s, i.device, i.compute_dtype, t)
    return {
        "checkpoints": s.n_blocks * t * h * a,
        "loss": LOSS_FLOAT32_COPIES * FLOAT32 * t * s.vocab_size,
        "block_recompute": t * (RECOMPUTE_HIDDEN_COPIES * h + RECOMPUTE_FFN_COPIES * f) * a + norms + tile + residue,
        "block_backward": t * (BACKWARD_HIDDEN_COPIES * h + BACKWARD_FFN_COPIES * f) * a + norms + residue,
    }
