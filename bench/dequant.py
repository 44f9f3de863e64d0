"""Dequantization throughput per bit width on a 4096x4096 weight, next to memory-copy bandwidth.

Throughput is GB/s of dense output written.  Prints a table and writes
``docs/dequant.md``.

    python bench/dequant.py [--dim 4096] [--repeats 10] [--threads 2]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch

from engine.quant import RTNQuantizer

DOCS = Path(__file__).resolve().parent.parent / "docs"


def best_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    n = args.dim
    src = torch.randn(n, n)
    dst = torch.empty_like(src)
    copy_gbs = src.nbytes / best_seconds(lambda: dst.copy_(src), args.repeats) / 1e9
    rows = [("memory copy (float32 -> float32)", "-", copy_gbs, 1.0)]
    for bits in (8, 4, 3, 2):
        q = RTNQuantizer(bits=bits, group_size=args.group_size).quantize(src)
        for dtype in (torch.float32, torch.bfloat16):
            out_bytes = n * n * torch.finfo(dtype).bits // 8
            gbs = out_bytes / best_seconds(lambda: q.dequantize(dtype), args.repeats) / 1e9
            rows.append((f"{bits}-bit g{args.group_size} -> {str(dtype).removeprefix('torch.')}",
                         f"{q.bits_per_weight:.3f}", gbs, gbs / copy_gbs))
    lines = [f"Dequantization of a {n}x{n} weight, {args.threads} threads, best of {args.repeats}", "",
             "| operation | bits/weight | GB/s of dense output | vs memory copy |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {bpw} | {gbs:.2f} | {ratio:.2f}x |" for name, bpw, gbs, ratio in rows]
    table = "\n".join(lines)
    print(table)
    DOCS.mkdir(exist_ok=True)
    (DOCS / "dequant.md").write_text(f"# Dequantization throughput\n\n`python bench/dequant.py`\n\n{table}\n")


if __name__ == "__main__":
    main()
