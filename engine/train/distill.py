"""Distillation of a quantized model's continuous parameters towards its float source (QuIP#'s end-to-end
fine-tuning, Tseng et al. 2024, section 5).

Rounding fixes the codes; what stays continuous is tuned afterwards so that the
quantized model's next-token distribution matches the float model's, with the
per-token KL(p_float || p_quantized) on calibration text:

* the float tensors outside the packed layers: embeddings, norms, output head
  (QuIP# tunes every unquantized parameter end to end);
* one gain per output row of each packed layer whose format has per-row scales
  (QuIP#'s input-incoherence weights, group-wise OPTQ/RTN), folded into those
  scales when training ends, so no bit is added.

There is no cross-entropy term: the target is the float model, not the text, so
distillation recovers what rounding lost and does not finetune past the float
model (``docs/quality.md``).  The codes, the sign vectors and the Hessian work
are untouched.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from engine.errors import EngineError
from engine.lora.linear import ModuLoRALinear

MICRO_WINDOWS = 4  # windows per forward: a 32k vocabulary's logits for 4 x 256 tokens are 131 MB


@dataclass(frozen=True)
class DistillResult:
    """First and last training loss (mean KL per token, nats) and the layers that got row gains."""

    first_loss: float
    last_loss: float
    gained_layers: int


@contextmanager
def row_gains(model: nn.Module) -> Iterator[dict[str, nn.Parameter]]:
    """A trainable gain per output row of every packed layer whose format can fold it (its output times the
    gain); on leaving, each gain is folded into its layer's scales."""
    gains: dict[str, nn.Parameter] = {}
    handles = []
    for name, layer in model.named_modules():
        if isinstance(layer, ModuLoRALinear) and layer.base.has_row_scales:
            device = next(layer.base.buffers()).device
            gain = nn.Parameter(torch.ones(layer.out_features, device=device))
            gains[name] = gain
            handles.append(layer.register_forward_hook(lambda _m, _i, out, g=gain: out * g.to(out.dtype)))
    try:
        yield gains
    finally:
        for handle in handles:
            handle.remove()
        with torch.no_grad():
            for name, gain in gains.items():
                layer = model.get_submodule(name)
                layer.base.scale_rows(gain.detach())
                if layer.bias is not None:  # the hook scaled the bias too
                    layer.bias.mul_(gain.detach().to(layer.bias))


def token_kl(student_logits: torch.Tensor, teacher_log_probs: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student), in float32."""
    s = student_logits.float().log_softmax(-1).flatten(0, -2)
    return F.kl_div(s, teacher_log_probs.float().flatten(0, -2), log_target=True, reduction="batchmean")


@torch.no_grad()
def teacher_log_probs(teacher: nn.Module, windows: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The teacher's next-token log-probabilities on every window, ``[windows, seq, vocab]`` in float16 on the
    host: one teacher pass over the calibration set, not one per step (128 windows of 256 tokens: 2 GiB for a 32k
    vocabulary, 34 MB for the shared model's 512)."""
    teacher.eval()
    parts = [teacher(input_ids=micro.to(device), use_cache=False).logits.float().log_softmax(-1).half().cpu()
             for micro in tqdm(windows.split(MICRO_WINDOWS), desc="distill: teacher", unit="batch", leave=False)]
    return torch.cat(parts)


def distill_continuous(
    student: nn.Module,
    teacher: nn.Module,
    windows: torch.Tensor,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
) -> DistillResult:
    """Tune ``student``'s continuous parameters (see the module docstring) for ``steps`` Adam steps on batches
    of ``batch_size`` token ``windows`` drawn with ``seed``; the learning rate decays on a cosine."""
    if steps < 1:
        raise EngineError(f"distillation needs at least one step, got {steps}")
    params = list(student.parameters())  # the packed weights are buffers: these are the float tensors
    device = next(student.buffers()).device
    targets = teacher_log_probs(teacher, windows, device)
    generator = torch.Generator().manual_seed(seed)
    losses: list[torch.Tensor] = []
    student.train()
    with row_gains(student) as gains, torch.enable_grad():
        trained = params + list(gains.values())
        for p in trained:
            p.requires_grad_(True)
        optimizer = torch.optim.Adam(trained, lr=lr)
        for step in tqdm(range(steps), desc="distill", unit="step", leave=False):
            for group in optimizer.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
            picked = torch.randint(0, len(windows), (batch_size,), generator=generator)
            total = torch.zeros((), device=device)
            for micro in picked.split(MICRO_WINDOWS):
                logits = student(input_ids=windows[micro].to(device), use_cache=False).logits
                loss = token_kl(logits, targets[micro].to(device))
                (loss * len(micro) / batch_size).backward()
                total += loss.detach() * len(micro) / batch_size
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(total)
        for p in trained:
            p.requires_grad_(False)
    student.eval()
    values = torch.stack(losses).tolist()  # one host sync for the whole run
    if not all(math.isfinite(v) for v in values):
        raise EngineError("distillation: the loss became non-finite; lower --distill-lr")
    return DistillResult(values[0], values[-1], len(gains))
