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


def measure(dim: int, repeats: int, threads: int, group_size: int) -> list[tuple[str, str, float, float]]:
    """``(operation, bits/weight, GB/s of dense output, ratio to a float32 copy)`` rows, the copy first."""
    torch.manual_seed(0)
    torch.set_num_threads(threads)
    n = dim
    src = torch.randn(n, n)
    dst = torch.empty_like(src)
    copy_gbs = src.nbytes / best_seconds(lambda: dst.copy_(src), repeats) / 1e9
    rows = [("memory copy (float32 -> float32)", "-", copy_gbs, 1.0)]
    for bits in (8, 4, 3, 2):
        q = RTNQuantizer(bits=bits, group_size=group_size).quantize(src)
        for dtype in (torch.float32, torch.bfloat16):
            out_bytes = n * n * torch.finfo(dtype).bits // 8
            gbs = out_bytes / best_seconds(lambda: q.dequantize(dtype), repeats) / 1e9
            rows.append((f"{bits}-bit g{group_size} -> {str(dtype).removeprefix('torch.')}",
                         f"{q.bits_per_weight:.3f}", gbs, gbs / copy_gbs))
    return rows


def markdown(rows: list[tuple[str, str, float, float]], dim: int, repeats: int, threads: int) -> str:
    lines = [f"Dequantization of a {dim}x{dim} weight, {threads} threads, best of {repeats}", "",
             "| operation | bits/weight | GB/s of dense output | G weights/s | vs memory copy |",
             "|---|---:|---:|---:|---:|"]
    for name, bpw, gbs, ratio in rows:
        width = 2 if "bfloat16" in name else 4
        lines.append(f"| {name} | {bpw} | {gbs:.2f} | {gbs / width:.2f} | {ratio:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=64)
    args = parser.parse_args()
    table = markdown(measure(args.dim, args.repeats, args.threads, args.group_size), args.dim, args.repeats,
                     args.threads)
    print(table)
    DOCS.mkdir(exist_ok=True)
    (DOCS / "dequant.md").write_text(f"# Dequantization throughput\n\n`python bench/dequant.py`\n\n{table}\n")


if __name__ == "__main__":
    main()
