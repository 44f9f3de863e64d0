"""Task metrics beyond perplexity: classification accuracy, ROUGE for summaries, greedy generation."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from engine.data.formats import FormatSpec, classification_prompt, label_word, summarization_prompt
from engine.data.records import load_records, require_columns
from engine.errors import EngineError
from engine.data.text import text_for, token_windows
from engine.data.dataset import build_examples
from engine.eval.perplexity import perplexity, response_perplexity
from engine.model import compute_device


def _prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str, max_len: int) -> list[int]:
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + ids[-(max_len - len(bos)) :]


@torch.no_grad()
def classification_accuracy(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    path: str | Path,
    spec: FormatSpec,
    limit: int | None = None,
    max_len: int = 256,
) -> dict[str, float]:
    """Accuracy of picking, per row, the label word with the highest total log-likelihood after the prompt."""
    records = load_records(path, spec.split)
    require_columns(records, spec.required_columns(), path)
    rows = records if limit is None else records.select(range(min(limit, len(records))))
    labels = sorted({str(v) for v in records[spec.column("label")]})
    words = {label: tokenizer(" " + label_word(spec, label), add_special_tokens=False)["input_ids"] for label in labels}
    model.eval()
    correct = 0
    for row in tqdm(rows, desc="classify", unit="row", leave=False):
        prompt = _prompt_ids(tokenizer, classification_prompt(spec, row), max_len - max(map(len, words.values())))
        candidates = [prompt + words[label] for label in labels]
        width = max(map(len, candidates))
        batch = torch.tensor([c + [0] * (width - len(c)) for c in candidates], device=compute_device(model))
        log_probs = F.log_softmax(model(input_ids=batch).logits.double(), dim=-1)
        scores = [
            sum(log_probs[i, len(prompt) - 1 + j, t].item() for j, t in enumerate(words[label]))
            for i, label in enumerate(labels)
        ]
        correct += labels[max(range(len(labels)), key=scores.__getitem__)] == str(row[spec.column("label")])
    return {"accuracy": correct / len(rows), "rows": len(rows)}


@torch.no_grad()
def generate(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompt: str, max_new_tokens: int = 64, max_len: int = 512
) -> str:
    """Greedy continuation of ``prompt`` (stops at EOS), decoded without special tokens."""
    ids = _prompt_ids(tokenizer, prompt, max_len - max_new_tokens)
    device = compute_device(model)
    out = model.generate(
        input_ids=torch.tensor([ids], device=device),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    return tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)


def summarization_rouge(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    path: str | Path,
    spec: FormatSpec,
    limit: int | None = None,
    max_new_tokens: int = 48,
    max_len: int = 512,
) -> dict[str, Any]:
    """Mean ROUGE-1/2/L F1 (Google's ``rouge-score``, stemmed) of greedy summaries against references."""
    from rouge_score import rouge_scorer

    records = load_records(path, spec.split)
    require_columns(records, spec.required_columns(), path)
    rows = records if limit is None else records.select(range(min(limit, len(records))))
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for row in tqdm(rows, desc="summarize", unit="row", leave=False):
        summary = generate(model, tokenizer, summarization_prompt(spec, row), max_new_tokens, max_len).split("\n")[0]
        for key, score in scorer.score(row[spec.column("summary")], summary).items():
            totals[key] += score.fmeasure
    return {**{k: v / len(rows) for k, v in totals.items()}, "rows": len(rows)}


RESPONSE_FORMATS = ("alpaca", "chat")  # scored by the perplexity of what they train on

def task_metric(data_format: str, data: str, tokenizer: PreTrainedTokenizerBase, spec: FormatSpec, limit: int | None,
                seq_len: int, batch_size: int, progress: bool) -> Callable[[PreTrainedModel], dict[str, Any]]:
    """A function model -> metrics for a data file of ``data_format``: perplexity for text (the whole
    file, BOS first, non-overlapping windows), accuracy for classification, ROUGE for summarization, the
    perplexity of the responses for instructions (alpaca) and of the assistant turns for chats."""
    if data_format == "text":
        windows = token_windows(tokenizer, text_for(tokenizer, data, limit and limit * seq_len), seq_len)[:limit]
        return lambda m: dict(vars(perplexity(m, windows, batch_size, progress)))
    if data_format == "classification":
        return lambda m: classification_accuracy(m, tokenizer, data, spec, limit, seq_len)
    if data_format == "summarization":
        return lambda m: summarization_rouge(m, tokenizer, data, spec, limit, max_len=seq_len)
    if data_format in RESPONSE_FORMATS:
        examples = build_examples(data, spec, tokenizer, seq_len, limit)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # masked: any id will do
        return lambda m: dict(vars(response_perplexity(m, examples, pad, batch_size, progress)))
    raise EngineError(f"no metric for data format {data_format!r}")
