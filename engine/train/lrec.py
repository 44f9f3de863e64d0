"""LREC: low-rank error correction of a quantized model towards its float teacher.

The student is the quantized model with LoRA on every decoder linear; the
teacher is the float model it was quantized from.  The loss per token is

    KL(p_teacher || p_student) + ce_weight * CE(student, next token)

averaged over the predicted tokens of a batch of calibration text (the INT2.1
recipe, Chai et al. 2023, sums the KL over a sequence and weighs the mean CE by
200; with a per-token mean KL the same balance is ``ce_weight`` of order 1).

``loftq_init`` is the LoftQ-style SVD initialisation (Li et al. 2023):
alternately quantize ``W - s B A`` and refit ``s B A`` to the residual with a
rank-r SVD, so training starts from a base and adapter that already cancel
most of the quantization error.  Without a quantizer it keeps the base and only
fits the adapter to its error: for a directory whose continuous parameters were
distilled after rounding, which re-quantizing would undo (``docs/lrec.md``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from engine.errors import EngineError

from engine.model.adapters import lora_layers
from engine.model.quantize import linear_weight
from engine.train.losses import linear_distillation, supports_chunked_loss
from engine.quant.base import LayerStats, Quantizer

DistillLoss = Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]


def distillation_loss(teacher: nn.Module, ce_weight: float) -> DistillLoss:
    """A trainer loss: per-token KL(teacher || student) plus ``ce_weight`` times cross-entropy, over tiles of
    the vocabulary (no logits tensor; the teacher may stream its blocks, its head may be on disk)."""
    teacher.eval()
    if not (supports_chunked_loss(teacher)):
        raise EngineError(f"{type(teacher).__name__}: LREC needs logits that are the output head's (no soft-capping)")

    def loss(student: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        with torch.no_grad():
            teacher_hidden = teacher.get_decoder()(**inputs).last_hidden_state
        hidden = student.get_decoder()(**inputs).last_hidden_state
        return linear_distillation(hidden, teacher_hidden, student.get_output_embeddings(),
                                   teacher.get_output_embeddings(), batch["labels"], ce_weight)

    return loss


@torch.no_grad()
def loftq_layer(
    weight: torch.Tensor, quantizer: Quantizer, rank: int, scaling: float, iters: int, stats: LayerStats | None = None
) -> tuple[object, torch.Tensor, torch.Tensor]:
    """``(qweight, A, B)`` with ``dequant(qweight) + scaling * B A ≈ weight``."""
    w = weight.detach().double()
    a = torch.zeros(rank, w.shape[1], dtype=torch.float64)
    b = torch.zeros(w.shape[0], rank, dtype=torch.float64)
    qweight = None
    for _ in range(max(1, iters)):
        qweight = quantizer.quantize((w - scaling * b @ a).float(), stats)
        a, b = residual_factors(w - qweight.dequantize(torch.float64), rank, scaling)
    return qweight, a.float(), b.float()


def residual_factors(residual: torch.Tensor, rank: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` with ``scaling * B A`` the best rank-``rank`` approximation of ``residual`` (the singular values
    split evenly between the two factors)."""
    u, s, vh = top_singular(residual, rank)
    root = (s[:rank] / scaling).sqrt()
    return root[:, None] * vh[:rank], u[:, :rank] * root


EXACT_SVD_MAX = 1024  # above this smaller side, the top singular triplets come from a randomized SVD
LOWRANK_OVERSAMPLE, LOWRANK_ITERS = 16, 2


def top_singular(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``rank`` largest singular triplets ``(U, S, Vᵀ)``: exactly for small matrices; for large ones (a 7B
    model's layers) by randomized subspace iteration (Halko et al.), seeded, which costs ``O(m n rank)`` instead
    of a full SVD's ``O(m n min(m, n))``."""
    if min(matrix.shape) <= EXACT_SVD_MAX:
        return torch.linalg.svd(matrix, full_matrices=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        u, s, v = torch.svd_lowrank(matrix, q=min(rank + LOWRANK_OVERSAMPLE, min(matrix.shape)), niter=LOWRANK_ITERS)
    return u, s, v.T


@torch.no_grad()
def loftq_init(
    student: nn.Module,
    teacher: nn.Module,
    quantizer: Quantizer | None,
    iters: int,
    stats: dict[str, LayerStats] | None = None,
    names: list[str] | None = None,
) -> None:
    """Re-quantize every adapted layer of ``student`` (or those in ``names``: one decoder block, whose teacher
    weights are resident) from ``teacher``'s float weight with LoftQ; with no ``quantizer``, keep each base and
    start its adapter at the top singular directions of ``W - dequant(base)``."""
    layers = {n: m for n, m in lora_layers(student).items() if names is None or n in names}
    for name, layer in tqdm(layers.items(), desc="loftq init", unit="layer", leave=False):
        weight = linear_weight(teacher.get_submodule(name))
        if quantizer is None:
            a, b = residual_factors(weight.double() - layer.base.dequantize(torch.float64), layer.rank, layer.scaling)
        else:
            layer.base, a, b = loftq_layer(weight, quantizer, layer.rank, layer.scaling, iters,
                                           stats and stats.get(name))
        layer.lora_a.data.copy_(a)
        layer.lora_b.data.copy_(b)
