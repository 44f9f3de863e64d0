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
most of the quantization error.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from engine.model.adapters import lora_layers
from engine.quant.base import LayerStats, Quantizer

DistillLoss = Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]


def distillation_loss(teacher: nn.Module, ce_weight: float, temperature: float = 1.0) -> DistillLoss:
    """A trainer loss: per-token KL(teacher || student) plus ``ce_weight`` times cross-entropy."""
    teacher.eval()

    def loss(student: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        with torch.no_grad():
            teacher_logits = teacher(**inputs).logits[:, :-1].float()
        student_logits = student(**inputs).logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        mask = labels != -100
        log_p_s = F.log_softmax(student_logits[mask] / temperature, dim=-1)
        log_p_t = F.log_softmax(teacher_logits[mask] / temperature, dim=-1)
        kl = F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean") * temperature**2
        ce = F.cross_entropy(student_logits[mask], labels[mask])
        return kl + ce_weight * ce

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
        residual = w - qweight.dequantize(torch.float64)
        u, s, vh = torch.linalg.svd(residual, full_matrices=False)
        root = (s[:rank] / scaling).sqrt()
        b = u[:, :rank] * root
        a = root[:, None] * vh[:rank]
    return qweight, a.float(), b.float()


def loftq_init(
    student: nn.Module,
    teacher: nn.Module,
    quantizer: Quantizer,
    iters: int,
    stats: dict[str, LayerStats] | None = None,
) -> None:
    """Re-quantize every adapted layer of ``student`` from ``teacher``'s float weight with LoftQ."""
    layers = lora_layers(student)
    for name, layer in tqdm(layers.items(), desc="loftq init", unit="layer", leave=False):
        weight = teacher.get_submodule(name).weight
        qweight, a, b = loftq_layer(weight, quantizer, layer.rank, layer.scaling, iters, stats and stats.get(name))
        layer.base = qweight
        layer.lora_a.data.copy_(a)
        layer.lora_b.data.copy_(b)
