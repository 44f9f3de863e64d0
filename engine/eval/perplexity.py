"""Perplexity on a text file, with one fixed protocol so numbers compare across methods.

The whole file is tokenized once with BOS at the start, cut into consecutive
non-overlapping windows of ``seq_len`` tokens (a ragged tail is dropped), and
``exp(mean NLL)`` over every predicted token is reported, with the
log-softmax computed in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from engine.errors import EngineError


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    nll: float
    tokens: int
    windows: int


def read_text(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise EngineError(f"{path}: no such file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise EngineError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def token_windows(tokenizer: PreTrainedTokenizerBase, text: str, seq_len: int) -> torch.Tensor:
    """``[n_windows, seq_len]`` token ids of ``text`` (BOS first)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id, *ids]
    n = len(ids) // seq_len
    if n == 0:
        raise EngineError(f"text has {len(ids)} tokens, fewer than one window of {seq_len}")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


@torch.no_grad()
def perplexity(
    model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 8, progress: bool = True
) -> Perplexity:
    """Perplexity of ``model`` over pre-cut token ``windows``."""
    was_training = model.training
    model.eval()
    total_nll, count = 0.0, 0
    device = next(model.parameters(), torch.empty(0)).device
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
