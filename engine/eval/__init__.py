"""Evaluation metrics: perplexity with a fixed protocol, accuracy, ROUGE, generation."""

from engine.eval.perplexity import Perplexity, perplexity
from engine.eval.tasks import EVAL_FORMATS, task_metric

__all__ = ["EVAL_FORMATS", "Perplexity", "perplexity", "task_metric"]
