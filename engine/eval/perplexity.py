"""Perplexity on a text file, with one fixed protocol so numbers compare across methods.

The whole file is tokenized once with BOS at the start, cut into consecutive
non-overlapping windows of ``seq_len`` tokens (a ragged tail is dropped), and
``exp(mean NLL)`` over every predicted token is reported, with the
log-softmax computed in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from engine.data import IGNORE, Example, collate
from engine.errors import EngineError
from engine.model import compute_device


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    nll: float
    tokens: int
    windows: int


@torch.no_grad()
def perplexity(
    model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 8, progress: bool = True
) -> Perplexity:
    """Perplexity of ``model`` over pre-cut token ``windows``."""
    was_training = model.training
    model.eval()
    total_nll, count = 0.0, 0
    device = compute_device(model)
    for start in tqdm(range(0, len(windows), batch_size), desc="perplexity", unit="batch", disable=not progress, leave=False):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch).logits[:, :-1]
        targets = batch[:, 1:]
        nll = F.cross_entropy(logits.double().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
        total_nll += nll.item()
        count += targets.numel()
    model.train(was_training)
    mean = total_nll / count
    return Perplexity(ppl=math.exp(mean), nll=mean, tokens=count, windows=len(windows))


@torch.no_grad()
def response_perplexity(
    model: torch.nn.Module, examples: list[Example], pad_id: int, batch_size: int = 8, progress: bool = True
) -> Perplexity:
    """Perplexity over the tokens each example trains on (an instruction's response, a chat's assistant turns),
    the same float64 protocol as :func:`perplexity`; ``windows`` counts the examples."""
    was_training = model.training
    model.eval()
    total_nll, count = 0.0, 0
    device = compute_device(model)
    for start in tqdm(range(0, len(examples), batch_size), desc="perplexity", unit="batch", disable=not progress,
                      leave=False):
        batch = {k: v.to(device) for k, v in collate(examples[start : start + batch_size], pad_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        targets = batch["labels"][:, 1:]
        nll = F.cross_entropy(logits.double().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum",
                              ignore_index=IGNORE)
        total_nll += nll.item()
        count += int((targets != IGNORE).sum())
    model.train(was_training)
    if count == 0:
        raise EngineError("no response tokens to score (every example was cut before its response: raise --seq-len)")
    mean = total_nll / count
    return Perplexity(ppl=math.exp(mean), nll=mean, tokens=count, windows=len(examples))
