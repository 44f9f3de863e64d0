"""Evaluation metrics."""

from engine.eval.perplexity import Perplexity, perplexity, read_text, token_windows

__all__ = ["Perplexity", "perplexity", "read_text", "token_windows"]
