"""Data-parallel finetuning throughput: one process against 2 Ray Train workers (gloo, CPU), on a Llama-shaped
model big enough that a step is matmul-bound.

The model goes through the commands users type: a random bfloat16 checkpoint in the Hugging Face layout (8
blocks of hidden 1024, intermediate 2816, a 32000-word vocabulary: 0.17 B parameters), ``modulora quantize
--method rtn --bits 4``, then ``modulora finetune`` three ways:

* 1 process, 1 thread: one worker's speed alone;
* 1 process, 2 threads: this 2-core machine's best single process;
* ``--workers 2 --threads 1``: 2 Ray Train workers, each with half of every global batch;
* 1 process, 1 thread, ``--batch-size 2 --grad-accum 2``: each worker's half as a micro-batch (the 2-worker
  adapter must equal its adapter bit for bit).

Tokens/s is the median over the steps after the first two (``metrics.jsonl``: global tokens over the step's
wall time); scaling efficiency is the 2-worker rate over twice the 1-thread rate.

    python bench/ddp.py [--work DIR] [--steps 6]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from _common import TRAIN_TXT, Cli, add_run_options, table, work_dir, write_doc
from scale import write_checkpoint

SHAPE = {"model_type": "llama", "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 8,
         "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": 32000, "max_position_embeddings": 2048,
         "rms_norm_eps": 1e-5}
RUNS = (("1 process, 1 thread", 1, []), ("1 process, 2 threads", 2, []),
        ("2 Ray Train workers x 1 thread", 1, ["--workers", 2, "--threads", 1]),
        ("1 process, 1 thread, 2 micro-batches of 2", 1, ["--batch-size", 2, "--grad-accum", 2]))


def steady_rate(run: Path) -> tuple[float, int]:
    """Median tokens/s over the steps after the first two, and the tokens of one step."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["tokens_per_second"] for r in records[2:]), int(records[-1]["tokens"])


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(next((run / "adapter").glob("*.safetensors")))


def relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest of each adapter tensor's max |a - b| over its max |a|."""
    return max(float((a[k] - b[k]).abs().max() / a[k].abs().max()) for k in a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_options(parser)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()
    with work_dir(args.work, "ddp") as work:
        config = work / "shape" / "config.json"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(json.dumps(SHAPE))
        if not (work / "ckpt").is_dir():
            write_checkpoint(work / "ckpt", str(config))
        cli = Cli(work, 1)
        if not (work / "q4").is_dir():
            cli.run("quantize", work / "ckpt", "--method", "rtn", "--bits", 4, "--out", work / "q4")
        rows, rates = [], []
        for label, threads, extra in RUNS:
            cli.threads = threads
            out = work / f"run-{len(rates)}"
            _, wall = cli.run("finetune", work / "q4", "--data", TRAIN_TXT, "--seq-len", args.seq_len,
                              "--limit", 4 * args.batch_size, "--batch-size", args.batch_size, "--steps", args.steps,
                              "--rank", 16, "--save-every", 0, *extra, "--overwrite", "--out", out)
            rate, tokens = steady_rate(out)
            rates.append(rate)
            rows.append([label, tokens, f"{rate:.0f}", f"{tokens / rate:.2f}", f"{wall:.0f}"])
            print(rows[-1], file=sys.stderr, flush=True)
        one, two_threads, workers, _ = rates
        one_thread, threads, parallel, halves = (adapter(work / f"run-{i}") for i in range(4))
        threads_vs_one = relative_difference(one_thread, threads)
        workers_vs_threads = relative_difference(threads, parallel)
        equal = all(torch.equal(parallel[k], halves[k]) for k in parallel)
    body = (
        "A Llama-shaped model (8 blocks, hidden 1024, intermediate 2816, vocabulary 32000; 0.17 B parameters; "
        "random bfloat16 weights written in the Hugging Face layout, then 4-bit RTN), LoRA rank 16 on every "
        f"linear, float32 compute, global batch {args.batch_size} x {args.seq_len} tokens, {args.steps} steps; "
        "this 2-core CPU, no GPU.\n\n"
        + table(["run", "tokens per step", "tokens/s", "s per step", "wall s (with start-up)"], rows)
        + f"\n\n- scaling efficiency of 2 workers: {workers / (2 * one):.2f} (their rate over twice one "
        f"1-thread process's); against the 2-thread process: {workers / two_threads:.2f}x (2 threads give one "
        f"process {two_threads / one:.2f}x of 1 thread).  The 2-thread process and the 2 workers both use both of "
        "this machine's cores, so here the cores bound the speed-up; on a cluster each worker brings its own GPU "
        "or node.  Every process, workers included, runs with the engine's bounded heap (glibc's mmap threshold "
        "held at 128 KiB).\n"
        f"- the 2-worker adapter equals the 1-thread process's with 2 micro-batches of 2 bit for bit: {equal}.  "
        f"Against the 2-thread process (one batch of 4) its max relative difference is {workers_vs_threads:.2g}, "
        f"the size of the difference between the 1-thread and 2-thread processes themselves ({threads_vs_one:.2g}): "
        "float32 reduction order, which Adam amplifies on this random-weight model's near-zero LoRA-B entries.\n"
        "- wall time includes loading the model in each process and, for the workers, starting Ray and the "
        "Ray Train worker group."
    )
    write_doc("ddp", "Data-parallel finetuning on Ray Train: throughput", "ddp.py", body, cli.commands)


if __name__ == "__main__":
    main()
