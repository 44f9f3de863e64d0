"""Causal-LM loss without the full logits tensor: the output head and cross-entropy run a tile of the vocabulary at a time.

With a 32000-word vocabulary and 512 positions the logits alone are 65 MB in
float32, and the usual ``model(..., labels=...)`` path holds several tensors of
that size at once (the logits, their float32 copy, the log-softmax saved for
backward, then its gradient): on a small model that is more than the packed
weights and every checkpointed activation together.  Here the frozen output
head is applied a tile of vocabulary rows at a time (as many logits as
``chunk_tokens`` positions over the whole vocabulary), with a running
log-sum-exp per position, and the gradient with respect to the hidden states is
gathered in the same pass (``softmax - one_hot``, times the head's weight, with
the softmax's running normaliser rescaled as the maximum moves), so nothing the
size of the logits outlives its tile, the head is read once, and the backward
pass only scales a saved ``[tokens, hidden]`` gradient.  The arithmetic is the
usual path's: logits in the head's dtype, upcast to float32 (at least), the
softmax cast back to the hidden states' dtype before the matmul with the head's
weight.  The tiles come from the head's weight or, for a head kept on disk
(``engine.offload.vocab.DiskHead``), from its ``weight_tiles``: the same tiles,
so the same bits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100
DEFAULT_CHUNK_TOKENS = 64

Tiles = Callable[[], Iterator[tuple[int, torch.Tensor, torch.Tensor | None]]]  # (first row, weight, bias) per tile


def _running_softmax(running_max: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One tile of a softmax over tiles: the new running maximum, the factor that rescales sums kept against the
    old one, and the tile's ``exp(logits - new maximum)`` (computed in place in ``logits``)."""
    new_max = torch.maximum(running_max, logits.amax(dim=-1))
    rescale = (running_max - new_max).exp_()
    return new_max, rescale, logits.sub_(new_max.unsqueeze(1)).exp_()


class TiledCrossEntropy(torch.autograd.Function):
    """``scale * sum_i CE(head(hidden_i), target_i)`` over rows, the frozen head given as ``tiles()``.

    ``scale`` (``1 / rows`` for a mean) multiplies the gradient saved for the hidden states.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, tiles: Tiles, targets: torch.Tensor, scale: float) -> torch.Tensor:
        want_grad = ctx.needs_input_grad[0]
        loss_dtype = torch.promote_types(hidden.dtype, torch.float32)  # at least float32, as the usual path
        running_max = torch.full((hidden.shape[0],), float("-inf"), dtype=loss_dtype, device=hidden.device)
        sum_exp, picked = torch.zeros_like(running_max), torch.zeros_like(running_max)
        if want_grad:  # sum over the vocabulary of exp(logit - running_max) * weight row; the targets' weight rows
            weighted = torch.zeros(hidden.shape, dtype=loss_dtype, device=hidden.device)
            target_rows = torch.zeros_like(weighted)
        for start, weight, bias in tiles():
            logits = F.linear(hidden, weight, bias).to(loss_dtype)
            positions = ((targets >= start) & (targets < start + weight.shape[0])).nonzero().squeeze(1)
            columns = targets[positions] - start
            picked[positions] = logits[positions, columns]
            new_max, rescale, probs = _running_softmax(running_max, logits)  # probs unnormalised
            sum_exp.mul_(rescale).add_(probs.sum(dim=-1))
            if want_grad:
                weighted.mul_(rescale.unsqueeze(1)).add_(probs.to(hidden.dtype) @ weight)
                target_rows[positions] = weight[columns].to(loss_dtype)
            running_max = new_max
        grad_hidden = None
        if want_grad:
            grad_hidden = weighted.div_(sum_exp.unsqueeze(1)).sub_(target_rows).mul_(scale).to(hidden.dtype)
        ctx.save_for_backward(grad_hidden)
        return (running_max + sum_exp.log() - picked).sum() * scale

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        (grad_hidden,) = ctx.saved_tensors
        if grad_hidden is None:
            return None, None, None, None
        return grad_hidden * grad_total.to(grad_hidden.dtype), None, None, None


class TiledDistillation(torch.autograd.Function):
    """``scale * sum_i [KL(p_t,i || p_s,i) + ce_weight * CE(p_s,i, target_i)]`` over rows, student logits
    ``student_tiles`` applied to ``hidden``, teacher logits ``teacher_tiles`` applied to ``teacher_hidden`` (no
    gradient), both a tile of vocabulary rows at a time.

    One pass with running maxima: the student's log-sum-exp, the teacher's, and ``sum p_t (z_t - z_s)`` (the
    teacher's weights rescaled as its maximum moves) give ``KL = sum p_t (z_t - z_s) - lse_t + lse_s``; the
    gradient for the hidden states, ``((1 + w) p_s - p_t - w onehot) W_s``, is gathered in the same pass.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, teacher_hidden: torch.Tensor, student_tiles: Tiles,
                teacher_tiles: Tiles, targets: torch.Tensor, ce_weight: float, scale: float) -> torch.Tensor:
        want_grad = ctx.needs_input_grad[0]
        dt = torch.promote_types(hidden.dtype, torch.float32)
        rows = hidden.shape[0]
        max_s = torch.full((rows,), float("-inf"), dtype=dt, device=hidden.device)
        max_t, sum_s, sum_t, cross, picked = max_s.clone(), *(torch.zeros_like(max_s) for _ in range(4))
        if want_grad:
            grad_s, grad_t, target_rows = (torch.zeros(hidden.shape, dtype=dt, device=hidden.device) for _ in range(3))
        for (start, weight, bias), (start_t, weight_t, bias_t) in zip(student_tiles(), teacher_tiles()):
            if start != start_t or weight.shape[0] != weight_t.shape[0]:
                raise ValueError("student and teacher heads must have the same vocabulary")
            z_s = F.linear(hidden, weight, bias).to(dt)
            z_t = F.linear(teacher_hidden, weight_t, bias_t).to(dt)
            positions = ((targets >= start) & (targets < start + weight.shape[0])).nonzero().squeeze(1)
            columns = targets[positions] - start
            picked[positions] = z_s[positions, columns]
            difference = z_t - z_s
            new_t, rescale_t, exp_t = _running_softmax(max_t, z_t)
            sum_t.mul_(rescale_t).add_(exp_t.sum(dim=-1))
            cross.mul_(rescale_t).add_((exp_t * difference).sum(dim=-1))
            new_s, rescale_s, exp_s = _running_softmax(max_s, z_s)  # unnormalised softmaxes
            sum_s.mul_(rescale_s).add_(exp_s.sum(dim=-1))
            if want_grad:
                grad_s.mul_(rescale_s.unsqueeze(1)).add_(exp_s.to(hidden.dtype) @ weight)
                grad_t.mul_(rescale_t.unsqueeze(1)).add_(exp_t.to(hidden.dtype) @ weight)
                target_rows[positions] = weight[columns].to(dt)
            max_s, max_t = new_s, new_t
        lse_s, lse_t = max_s + sum_s.log(), max_t + sum_t.log()
        kl = cross / sum_t - lse_t + lse_s
        grad_hidden = None
        if want_grad:
            grad_hidden = (grad_s.div_(sum_s.unsqueeze(1)).mul_(1 + ce_weight).sub_(grad_t.div_(sum_t.unsqueeze(1)))
                           .sub_(target_rows.mul_(ce_weight)).mul_(scale).to(hidden.dtype))
        ctx.save_for_backward(grad_hidden)
        return (kl + ce_weight * (lse_s - picked)).sum() * scale

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (grad_hidden,) = ctx.saved_tensors
        grad = None if grad_hidden is None else grad_hidden * grad_total.to(grad_hidden.dtype)
        return grad, None, None, None, None, None, None


def head_tiles(head: nn.Module, tile_rows: int) -> Tiles:
    """The tiles of ``tile_rows`` vocabulary rows of an ``nn.Linear`` (views) or of a head on disk (reads)."""
    if hasattr(head, "weight_tiles"):
        return lambda: ((start, weight, None) for start, weight in head.weight_tiles(tile_rows))

    def linear() -> Iterator[tuple[int, torch.Tensor, torch.Tensor | None]]:
        for start in range(0, head.out_features, tile_rows):
            rows = slice(start, start + tile_rows)
            yield start, head.weight[rows], None if head.bias is None else head.bias[rows]

    return linear


def linear_cross_entropy(
    hidden: torch.Tensor,
    head: nn.Module,
    labels: torch.Tensor,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> torch.Tensor:
    """Mean next-token cross-entropy of ``head(hidden)`` against ``labels`` shifted by one (``-100``: ignored).

    ``head`` is a frozen ``nn.Linear`` or a head on disk; the logits alive at once are as many as
    ``chunk_tokens`` positions over the whole vocabulary.
    """
    if any(p.requires_grad for p in head.parameters()):
        raise ValueError("linear_cross_entropy needs a frozen output head")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].reshape(-1)
    valid = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, valid)
    tile_rows = max(1, chunk_tokens * head.out_features // max(rows.shape[0], 1))
    scale = 1.0 / max(valid.numel(), 1)
    return TiledCrossEntropy.apply(rows, head_tiles(head, tile_rows), targets.index_select(0, valid), scale)


def linear_distillation(
    hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    head: nn.Module,
    teacher_head: nn.Module,
    labels: torch.Tensor,
    ce_weight: float,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> torch.Tensor:
    """Mean over predicted tokens of KL(teacher || student) + ``ce_weight`` x cross-entropy (LREC), the frozen
    heads applied a tile of the vocabulary at a time (as :func:`linear_cross_entropy`)."""
    targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].reshape(-1)
    valid = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, valid)
    teacher_rows = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).index_select(0, valid)
    tile_rows = max(1, chunk_tokens * head.out_features // max(rows.shape[0], 1))
    scale = 1.0 / max(valid.numel(), 1)
    return TiledDistillation.apply(rows, teacher_rows, head_tiles(head, tile_rows), head_tiles(teacher_head, tile_rows),
                                   targets.index_select(0, valid), ce_weight, scale)


def supports_chunked_loss(model: nn.Module) -> bool:
    """Whether the model's logits are exactly ``lm_head(decoder(...))``, with a frozen head."""
    config = getattr(model, "config", None)
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None) not in (None, 1, 1.0):
        return False
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return (
        (isinstance(head, nn.Linear) or hasattr(head, "weight_tiles"))
        and hasattr(model, "get_decoder")
        and not any(p.requires_grad for p in head.parameters())
    )


def chunked_causal_lm_loss(
    model: nn.Module, batch: dict[str, torch.Tensor], chunk_tokens: int = DEFAULT_CHUNK_TOKENS
) -> torch.Tensor:
    """The trainer's causal-LM loss (same value as ``model(..., labels=...).loss``) without full logits.

    Falls back to the model's own loss when its logits are more than ``lm_head(hidden)``
    or its head trains.
    """
    if not supports_chunked_loss(model):
        return model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=batch["labels"]).loss
    decoder = model.get_decoder()
    hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).last_hidden_state
    return linear_cross_entropy(hidden, model.get_output_embeddings(), batch["labels"], chunk_tokens)
