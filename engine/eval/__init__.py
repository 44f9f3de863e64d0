"""Evaluation metrics: perplexity with a fixed protocol, accuracy, ROUGE, generation."""

from engine.eval.perplexity import Perplexity, perplexity
from engine.eval.tasks import task_metric

__all__ = ["Perplexity", "perplexity", "task_metric"]
