"""SST-2: LoRA on the float model against ModuLoRA at 4, 3 and 2 bits, with one training budget.

Every model is finetuned with ``modulora finetune --format classification``
(label words 0=negative, 1=positive) on the first ``--limit`` rows of
``sst2/train.tsv`` with the same steps, batch, learning rate and rank, and
evaluated by accuracy on all 872 rows of ``sst2/dev.tsv`` (the label word with
the higher likelihood wins), before and after finetuning.  Quantized bases come
from ``modulora quantize`` (``--quantizer``; calibrated methods read
``tinystories/train.txt``).  Prints a table and writes ``docs/sst2.md`` and
``docs/sst2.png``.

    python bench/sst2.py [--bits 4,3,2] [--quantizer optq] [--steps 600] [--seeds 0] [--work DIR]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

from _common import DOCS, GGUF, SST2_DEV, SST2_LABELS, SST2_TRAIN, TRAIN_TXT, Cli, add_run_options, table, work_dir, write_doc

QUANTIZE_OPTIONS: dict[str, tuple[Any, ...]] = {
    "rtn": (),
    "optq": ("--no-act-order", "--clip-search", "--asym-alpha", 0, "--calib", TRAIN_TXT),  # settings of the
    "quip": ("--asym-alpha", 0, "--calib", TRAIN_TXT),  # published figures, spelled out: defaults move
}


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [100 * r["zero_shot"] for r in rows], 0.4, label="before finetuning")
    after = [100 * statistics.mean(r["finetuned"]) for r in rows]
    ax.bar([i + 0.2 for i in x], after, 0.4, label="after LoRA / ModuLoRA")
    ax.axhline(100 * rows[0]["majority"], color="grey", linestyle=":", label="majority class")
    ax.set_xticks(list(x), [r["name"] for r in rows])
    ax.set_ylabel("SST-2 dev accuracy (%)")
    ax.set_ylim(40, 100)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", default="4,3,2")
    parser.add_argument("--quantizer", default="optq", choices=sorted(QUANTIZE_OPTIONS))
    parser.add_argument("--limit", type=int, default=20000, help="Training rows (the head of train.tsv).")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256, help="Longer prompts lose their beginning.")
    parser.add_argument("--seeds", default="0", help="Comma-separated training seeds; accuracies are averaged.")
    add_run_options(parser)
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    with work_dir(args.work, "sst2") as work:
        cli = Cli(work, args.threads)
        labelled = (*SST2_LABELS, "--seq-len", args.seq_len)
        budget = ("--steps", args.steps, "--batch-size", args.batch_size, "--lr", args.lr, "--rank", args.rank,
                  "--limit", args.limit, "--save-every", 0)

        bases: list[tuple[str, Any]] = [("float", GGUF)]
        for bits in (int(b) for b in args.bits.split(",")):
            out = work / f"q{bits}"
            cli.run("quantize", GGUF, "--method", args.quantizer, "--bits", bits, *QUANTIZE_OPTIONS[args.quantizer],
                    "--out", out)
            bases.append((f"{bits}-bit {args.quantizer}", out))

        rows = []
        for name, base in bases:
            before = cli.evaluate(base, SST2_DEV, *labelled)
            finetuned, seconds = [], 0.0
            for seed in seeds:
                run = work / f"{name.split()[0]}-seed{seed}"
                _, wall = cli.run("finetune", base, "--data", SST2_TRAIN, *labelled, *budget, "--seed", seed,
                                  "--out", run)
                seconds += wall
                finetuned.append(cli.evaluate(run, SST2_DEV, *labelled)["accuracy"])
            rows.append({"name": name, "zero_shot": before["accuracy"], "finetuned": finetuned,
                         "bits": before["bits_per_weight"], "seconds": seconds / len(seeds)})
        labels = [line.split("\t")[-1].strip() for line in SST2_DEV.read_text().splitlines()[1:]]
        majority = max(labels.count("0"), labels.count("1")) / len(labels)
        for row in rows:
            row["majority"] = majority

        reference = statistics.mean(rows[0]["finetuned"])
        table_rows = [
            [r["name"], f"{r['bits']:.3f}", f"{100 * r['zero_shot']:.1f}",
             " / ".join(f"{100 * a:.1f}" for a in r["finetuned"]) if len(seeds) > 1 else f"{100 * r['finetuned'][0]:.1f}",
             f"{100 * statistics.mean(r['finetuned']):.1f}", f"{100 * (statistics.mean(r['finetuned']) - reference):+.1f}",
             f"{r['seconds']:.0f}"]
            for r in rows
        ]
        body = "\n\n".join([
            f"Budget for every model: {args.steps} steps x batch {args.batch_size} (first {args.limit} rows of "
            f"`train.tsv`), lr {args.lr:g}, LoRA rank {args.rank} (alpha {2 * args.rank}) on every decoder linear, "
            f"prompts cut to {args.seq_len} tokens, seed(s) {args.seeds}. Quantized bases: `modulora quantize "
            f"--method {args.quantizer}` (see lrec.md for how the quantizers compare). Dev set: all "
            f"{len(labels)} rows; majority class {100 * majority:.1f}%; one row is 0.11 points.",
            table(["model", "bits/weight", "acc. before (%)", "acc. per seed (%)", "acc. (%)", "vs float (points)",
                   "finetune s"], table_rows),
            "![SST-2 accuracy](sst2.png)",
        ])
        print(body)
        plot(rows, DOCS / "sst2.png")
        write_doc("sst2", "SST-2: LoRA on the float model and ModuLoRA at 4, 3 and 2 bits", "sst2.py", body,
                         cli.commands)


if __name__ == "__main__":
    main()
