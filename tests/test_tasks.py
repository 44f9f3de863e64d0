"""Greedy generation against a hand-written argmax loop; ROUGE of generated summaries."""

from __future__ import annotations

import pytest
import torch

from conftest import SHARED
from engine.data import FormatSpec
from engine.eval.tasks import generate, summarization_rouge


def argmax_continuation(model, tokenizer, ids: list[int], max_new_tokens: int) -> str:
    """Greedy decoding written out: the most likely next token, one at a time, until EOS."""
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            next_id = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
            new.append(next_id)
            if next_id == tokenizer.eos_token_id:
                break
    return tokenizer.decode(new, skip_special_tokens=True)


def test_greedy_generation_matches_an_argmax_loop(float_model):
    model, tokenizer = float_model
    prompt = "Once upon a time, there was a little dog"
    ids = [tokenizer.bos_token_id, *tokenizer(prompt, add_special_tokens=False).input_ids]
    assert generate(model, tokenizer, prompt, max_new_tokens=12) == argmax_continuation(model, tokenizer, ids, 12)


def test_summarization_rouge_is_a_mean_of_f1(float_model):
    """The metric equals rouge_score called directly on each greedy summary (an argmax loop here), averaged."""
    import csv

    from rouge_score import rouge_scorer

    model, tokenizer = float_model
    path = SHARED / "data" / "samsum" / "validation.csv"
    scores = summarization_rouge(model, tokenizer, path, FormatSpec("summarization"), limit=4, max_new_tokens=24)
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))[:4]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    expected = {"rouge1": [], "rouge2": [], "rougeL": []}
    for row in rows:
        prompt = tokenizer(row["dialogue"] + "\nSummary:", add_special_tokens=False).input_ids
        ids = [tokenizer.bos_token_id, *prompt[-(512 - 24 - 1):]]
        summary = argmax_continuation(model, tokenizer, ids, 24).split("\n")[0]
        for key, score in scorer.score(row["summary"], summary).items():
            expected[key].append(score.fmeasure)
    assert scores["rows"] == 4
    for key, values in expected.items():
        assert scores[key] == pytest.approx(sum(values) / len(values), abs=1e-12), key
    assert any(v > 0 for v in expected["rouge1"])  # the check compares real overlaps, not zeros
