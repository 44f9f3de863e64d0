"""Perplexity on a text file, with one fixed protocol so numbers compare across methods.

The whole file is tokenized once with BOS at the start, cut into consecutive
non-overlapping windows of ``seq_len`` tokens (a ragged tail is dropped), and
``exp(mean NLL)`` over every predicted token is reported, with the
log-softmax computed in float64.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
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


def perplexity(
    model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 8, progress: bool = True
) -> Perplexity:
    """Perplexity of ``model`` over pre-cut token ``windows``."""
    batches = ({"input_ids": windows[start : start + batch_size]} for start in range(0, len(windows), batch_size))
    return _scored(model, batches, -(-len(windows) // batch_size), len(windows), progress)


def response_perplexity(
    model: torch.nn.Module, examples: list[Example], pad_id: int, batch_size: int = 8, progress: bool = True
) -> Perplexity:
    """Perplexity over the tokens each example trains on (an instruction's response, a chat's assistant turns),
    the same float64 protocol as :func:`perplexity`; ``windows`` counts the examples."""
    batches = (collate(examples[start : start + batch_size], pad_id) for start in range(0, len(examples), batch_size))
    return _scored(model, batches, -(-len(examples) // batch_size), len(examples), progress)


@torch.no_grad()
def _scored(model: torch.nn.Module, batches: Iterator[dict[str, torch.Tensor]], n_batches: int, n_items: int,
            progress: bool) -> Perplexity:
    """``exp(mean NLL)`` of each batch's next tokens (its ``labels``, else its ``input_ids``; ``IGNORE`` labels
    are not scored), log-softmax in float64."""
    was_training = model.training
    model.eval()
    total_nll, count = 0.0, 0
    device = compute_device(model)
    for batch in tqdm(batches, total=n_batches, desc="perplexity", unit="batch", disable=not progress, leave=False):
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels", batch["input_ids"])
        logits = model(**batch).logits[:, :-1]
        targets = labels[:, 1:]
        nll = F.cross_entropy(logits.double().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum",
                              ignore_index=IGNORE)
        total_nll += nll.item()
        count += int((targets != IGNORE).sum())
    model.train(was_training)
    if count == 0:
        raise EngineError("no tokens to score (every example was cut before its response: raise --seq-len)")
    mean = total_nll / count
    return Perplexity(ppl=math.exp(mean), nll=mean, tokens=count, windows=n_items)
