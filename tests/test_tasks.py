"""Greedy generation against a hand-written argmax loop; ROUGE of generated summaries."""

from __future__ import annotations

import torch

from conftest import SHARED
from engine.data import FormatSpec
from engine.eval.tasks import generate, summarization_rouge


def test_greedy_generation_matches_an_argmax_loop(float_model):
    model, tokenizer = float_model
    prompt = "Once upon a time, there was a little dog"
    ids = [tokenizer.bos_token_id, *tokenizer(prompt, add_special_tokens=False).input_ids]
    n_prompt = len(ids)
    with torch.no_grad():
        for _ in range(12):
            next_id = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(next_id)
            if next_id == tokenizer.eos_token_id:
                break
    expected = tokenizer.decode(ids[n_prompt:], skip_special_tokens=True)
    assert generate(model, tokenizer, prompt, max_new_tokens=12) == expected


def test_summarization_rouge_is_a_mean_of_f1(float_model):
    model, tokenizer = float_model
    scores = summarization_rouge(model, tokenizer, SHARED / "data" / "samsum" / "validation.csv",
                                 FormatSpec("summarization"), limit=2, max_new_tokens=8)
    assert scores["rows"] == 2
    assert all(0.0 <= scores[k] <= 1.0 for k in ("rouge1", "rouge2", "rougeL"))
    assert scores["rouge2"] <= scores["rouge1"]
