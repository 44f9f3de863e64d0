"""QDyLoRA: one dynamic-rank run (R=16) against separate fixed-rank runs, on a quantized model.

The base is the shared model quantized (3-bit RTN by default).  Every run
finetunes LoRA on ``tinystories/train.txt`` (causal LM) for the same number of
steps with the same batch and learning rate; the metric is perplexity on the
whole of ``tinystories/valid.txt``.  The dynamic run (``--rank-max 16
--dynamic``) is evaluated at every rank with one ``modulora eval --ranks``; each
fixed-rank run at its own rank.  Prints a table and writes ``docs/qdylora.md``
and ``docs/qdylora.png``.

    python bench/qdylora.py [--method rtn] [--bits 3] [--ranks 1,2,4,8,16] [--steps 150] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from engine.train import SCHEDULES

from _common import DOCS, GGUF, TRAIN_TXT, VALID_TXT, Cli, add_run_options, table, work_dir, write_doc


def finetune(cli: Cli, base: Path, out: Path, steps: int, *options: Any) -> dict[str, float]:
    """Train; returns the command's wall seconds and the training loop's own seconds."""
    _, wall = cli.run("finetune", base, "--data", TRAIN_TXT, "--format", "text", "--steps", steps,
                      "--save-every", 0, "--out", out, *options)
    return {"wall": wall, "train": json.loads((out / "report.json").read_text())["train_seconds"]}


def plot(ranks: list[int], dynamic: dict[str, dict[int, float]], fixed: dict[int, float], base_ppl: float,
         float_ppl: float, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for schedule, ppl in dynamic.items():
        ax.plot(ranks, [ppl[r] for r in ranks], "o-", label=f"one dynamic run (R={ranks[-1]}), {schedule}")
    ax.plot(ranks, [fixed[r] for r in ranks], "s--", label="a fixed-rank run per rank")
    ax.axhline(base_ppl, color="grey", linestyle=":", label=f"quantized, no adapter ({base_ppl:.2f})")
    ax.axhline(float_ppl, color="black", linestyle="--", linewidth=1, label=f"float ({float_ppl:.2f})")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ranks, [str(r) for r in ranks])
    ax.set_xlabel("adapter rank")
    ax.set_ylabel("perplexity on valid.txt")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="rtn", help="Quantizer of the base (calibrated ones read train.txt).")
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--ranks", default="1,2,4,8,16", help="Ranks to evaluate; the largest is the dynamic R.")
    parser.add_argument("--steps", type=int, default=150)
    add_run_options(parser)
    args = parser.parse_args()
    ranks = sorted(int(r) for r in args.ranks.split(","))
    with work_dir(args.work, "qdylora") as work:
        cli = Cli(work, args.threads)

        base = work / "base"
        calib = ("--calib", TRAIN_TXT) if args.method in ("optq", "quip") else ()
        cli.run("quantize", GGUF, "--method", args.method, "--bits", args.bits, *calib, "--out", base)
        float_ppl = cli.evaluate(GGUF, VALID_TXT)["ppl"]
        base_ppl = cli.evaluate(base, VALID_TXT)["ppl"]

        dynamic: dict[str, dict[int, float]] = {}
        dynamic_time: dict[str, dict[str, float]] = {}
        for schedule in SCHEDULES:
            run = work / f"dynamic-{schedule}"
            dynamic_time[schedule] = finetune(cli, base, run, args.steps, "--rank-max", ranks[-1], "--dynamic",
                                              "--rank-schedule", schedule)
            out, eval_wall = cli.run("eval", run, "--data", VALID_TXT, "--json", "--ranks", ",".join(map(str, ranks)))
            dynamic_time[schedule]["wall"] += eval_wall
            dynamic[schedule] = {int(r): v["ppl"] for r, v in json.loads(out.strip().splitlines()[-1])["ranks"].items()}

        fixed, fixed_train, fixed_wall = {}, 0.0, 0.0
        for rank in ranks:
            times = finetune(cli, base, work / f"rank-{rank}", args.steps, "--rank", rank)
            out, eval_wall = cli.run("eval", work / f"rank-{rank}", "--data", VALID_TXT, "--json")
            fixed[rank] = json.loads(out.strip().splitlines()[-1])["ppl"]
            fixed_train += times["train"]
            fixed_wall += times["wall"] + eval_wall

        rows = [[r, f"{fixed[r]:.3f}", *(f"{dynamic[k][r]:.3f} ({dynamic[k][r] / fixed[r] - 1:+.1%})" for k in SCHEDULES)]
                for r in ranks]
        times = [*([f"one dynamic run, {k}", 1, f"{dynamic_time[k]['train']:.0f}", f"{dynamic_time[k]['wall']:.0f}",
                    f"{dynamic_time[k]['train'] / fixed_train:.2f}"] for k in SCHEDULES),
                 [f"{len(ranks)} fixed-rank runs", len(ranks), f"{fixed_train:.0f}", f"{fixed_wall:.0f}", "1.00"]]
        name = f"{args.bits}-bit {args.method}"
        body = "\n\n".join([
            f"Base: the shared model quantized with {name} (perplexity {base_ppl:.3f}; float {float_ppl:.3f}). "
            f"Every run: `modulora finetune` on `train.txt` (format text) for {args.steps} steps with the CLI's "
            f"default batch, learning rate and alpha = 2 x rank (the dynamic run: alpha = {2 * ranks[-1]} over its "
            f"trained rank {ranks[-1]}, so the same scale 2 at every rank it samples and is evaluated at; DyLoRA's "
            "alpha / b, which rescales the shared components with the rank, left its rank-1 prefix 37% above the "
            "rank-1 run: 7.064 against 5.144 in the same setting). Metric: perplexity on the whole of `valid.txt`.",
            "Rank schedules (`--rank-schedule`, `engine/train/rank_schedule.py`): `uniform` trains one rank a step, "
            "uniform on 1..R (QDyLoRA as published); `pair` a rank drawn with P(b) proportional to 1/b and R itself, "
            "half the loss each (two passes a step); `nested` every power of two up to R, rank 1 and R at twice the "
            "weight of the others (five passes a step); `sampled` rank 1 and R at their nested weights and one "
            "power of two between drawn uniformly, carrying the weight of all of them (three passes a step, the "
            "nested loss in expectation).",
            table(["rank", "ppl, fixed-rank run", *(f"ppl, dynamic {k} (vs fixed)" for k in SCHEDULES)], rows),
            "![perplexity per rank](qdylora.png)",
            "Wall time (this machine, shared CPU; `train s` is the training loop alone, `total s` every command "
            "including model loading and evaluation):\n\n"
            + table(["approach", "training runs", "train s", "total s", "train s / fixed runs'"], times),
        ])
        print(body)
        plot(ranks, dynamic, fixed, base_ppl, float_ppl, f"QDyLoRA on {name}, {args.steps} steps", DOCS / "qdylora.png")
        write_doc("qdylora", "QDyLoRA: one dynamic-rank run against fixed-rank runs", "qdylora.py", body,
                         cli.commands)


if __name__ == "__main__":
    main()
