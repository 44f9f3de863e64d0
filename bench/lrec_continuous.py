"""Probe: would LREC at 2 bits gain from training the base's continuous parameters beside the adapter?

``modulora correct`` trains the adapter alone; distillation (``--distill-steps``)
trains the norms and one gain per output row, but against the teacher only.
This probe runs the correction's own loss (KL + cross-entropy over vocabulary
tiles), initialisation (the adapter fitted to a distilled base's error) and
learning-rate schedule in one process, twice from the same quantized directory
and the same draws of ``train.txt``: once training the adapter alone, once also
the norms and the row gains (folded into the scales and the adapter's B at the
end), and prints both perplexities on ``valid.txt``.  It is a probe, not a
product path: its figures go into ``docs/lrec.md`` next to the ``correct``
options tried, to say whether the product should train them.

    python bench/lrec_continuous.py QUANTIZED_DIR [--steps 300]
"""

from __future__ import annotations

import argparse
import time

import torch

from _common import GGUF, TRAIN_TXT, VALID_TXT
from engine.data import FormatSpec, build_examples, read_text
from engine.data.dataset import collate
from engine.data.text import token_windows
from engine.eval.perplexity import perplexity
from engine.model import add_lora, load_float_model, load_quantized, lora_parameters
from engine.train import TrainSpec, distillation_loss, loftq_init
from engine.train.distill import row_gains

RANK, BATCH, SEQ_LEN = 8, 8, 256  # correct's defaults


def corrected_perplexity(quantized: str, steps: int, continuous: bool) -> tuple[float, float]:
    """Valid perplexity after ``steps`` correction steps, and the training seconds."""
    teacher, tokenizer = load_float_model(GGUF, torch.float32)
    student, _, _ = load_quantized(quantized)
    add_lora(student, RANK, 2.0 * RANK, seed=0)
    loftq_init(student, teacher, None, 1)
    examples = build_examples(TRAIN_TXT, FormatSpec("text"), tokenizer, SEQ_LEN)
    loss_fn, spec = distillation_loss(teacher, 1.0), TrainSpec(steps=steps)
    draws = torch.Generator().manual_seed(0)
    norms = [p for name, p in student.named_parameters() if "norm" in name]
    start = time.perf_counter()
    with row_gains(student) as gains:
        trained = list(lora_parameters(student).values()) + (norms + list(gains.values()) if continuous else [])
        for p in trained:
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW(trained, lr=spec.lr, weight_decay=0.0)
        student.train()
        for step in range(steps):
            for group in optimizer.param_groups:
                group["lr"] = spec.lr_at(step)
            picked = torch.randint(0, len(examples), (BATCH,), generator=draws).tolist()
            loss_fn(student, collate([examples[i] for i in picked], 0)).backward()
            torch.nn.utils.clip_grad_norm_(trained, spec.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for name, gain in gains.items():  # the gain scaled the adapter's output too; leaving folds the base's
                student.get_submodule(name).lora_b.mul_(gain[:, None])
    seconds = time.perf_counter() - start
    student.eval()
    windows = token_windows(tokenizer, read_text(VALID_TXT), SEQ_LEN)
    return perplexity(student, windows, progress=False).ppl, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("quantized", help="a distilled quantized directory (modulora quantize --distill-steps)")
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    print("| trained | ppl | train s |\n|---|---:|---:|")
    for continuous in (False, True):
        ppl, seconds = corrected_perplexity(args.quantized, args.steps, continuous)
        print(f"| adapter{' + norms + row gains' if continuous else ''} | {ppl:.3f} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
