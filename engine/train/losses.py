"""Causal-LM loss without the full logits tensor: the output head and cross-entropy run a chunk of positions at a time.

With a 32000-word vocabulary and 512 positions the logits alone are 65 MB in
float32, and the usual ``model(..., labels=...)`` path holds several tensors of
that size at once (the logits, their float32 copy, the log-softmax saved for
backward, then its gradient): on a small model that is more than the packed
weights and every checkpointed activation together.  Here the frozen output
head is applied to ``chunk_tokens`` positions at a time, and the gradient with
respect to the hidden states is computed right there in the forward pass
(``softmax - one_hot``, times the head's weight), so nothing the size of the
logits outlives its chunk and the backward pass only scales a saved
``[tokens, hidden]`` gradient.  The arithmetic is the usual path's: logits in
the head's dtype, upcast to float32 (at least) for the log-softmax, the gradient
cast back before the matmul with the head's weight.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100
DEFAULT_CHUNK_TOKENS = 64


class LinearCrossEntropy(torch.autograd.Function):
    """``scale * sum_i CE(hidden_i @ weight^T + bias, target_i)`` over rows; the head (``weight``, ``bias``) is frozen.

    ``scale`` (``1 / rows`` for a mean) is applied to the logits' gradient before it is cast back to the
    hidden states' dtype, where the usual path applies it too.
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        chunk_tokens: int,
        scale: float,
    ) -> torch.Tensor:
        want_grad = ctx.needs_input_grad[0]
        loss_dtype = torch.promote_types(hidden.dtype, torch.float32)  # at least float32, as the usual path
        total = torch.zeros((), dtype=loss_dtype, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if want_grad else None
        for start in range(0, hidden.shape[0], chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            logits = F.linear(hidden[rows], weight, bias).to(loss_dtype)
            target = targets[rows]
            log_z = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, target.unsqueeze(1)).squeeze(1)
            total += (log_z - picked).sum()
            if want_grad:
                probs = logits.sub_(log_z.unsqueeze(1)).exp_()  # softmax, in the logits' buffer
                probs.scatter_add_(1, target.unsqueeze(1), torch.full_like(picked, -1.0).unsqueeze(1))
                grad_hidden[rows] = probs.mul_(scale).to(hidden.dtype) @ weight
        ctx.save_for_backward(grad_hidden)
        return total * scale

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None, None, None]:
        (grad_hidden,) = ctx.saved_tensors
        if grad_hidden is None:
            return None, None, None, None, None, None
        return grad_hidden * grad_total.to(grad_hidden.dtype), None, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    head: nn.Linear,
    labels: torch.Tensor,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> torch.Tensor:
    """Mean next-token cross-entropy of ``head(hidden)`` against ``labels`` shifted by one (``-100``: ignored)."""
    if head.weight.requires_grad or (head.bias is not None and head.bias.requires_grad):
        raise ValueError("linear_cross_entropy needs a frozen output head")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].reshape(-1)
    valid = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, valid)
    scale = 1.0 / max(valid.numel(), 1)
    return LinearCrossEntropy.apply(rows, head.weight, head.bias, targets.index_select(0, valid), chunk_tokens, scale)


def supports_chunked_loss(model: nn.Module) -> bool:
    """Whether the model's logits are exactly ``lm_head(decoder(...))``, with a frozen head."""
    config = getattr(model, "config", None)
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None) not in (None, 1, 1.0):
        return False
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return (
        isinstance(head, nn.Linear)
        and hasattr(model, "get_decoder")
        and not head.weight.requires_grad
        and (head.bias is None or not head.bias.requires_grad)
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
