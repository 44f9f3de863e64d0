"""Peak memory of forward+backward: a stack of ModuLoRA layers versus dense nn.Linear + LoRA.

Each configuration runs in a fresh subprocess.  After building the stack the
process's high-water mark is reset (``/proc/self/clear_refs``), so the figures
are the training step's peak, not the construction spike.  Prints a table and
writes ``docs/memory.md``.

    python bench/memory.py [--layers 8] [--dim 4096] [--tokens 512] [--rank 16]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

from engine.procstat import PeakRss

DOCS = Path(__file__).resolve().parent.parent / "docs"


class DenseLoRA(nn.Module):
    """Frozen dense weight + LoRA with ordinary autograd (what PEFT does on a float model)."""

    def __init__(self, weight: torch.Tensor, rank: int) -> None:
        super().__init__()
        self.base = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        self.base.weight = nn.Parameter(weight, requires_grad=False)
        self.lora_a = nn.Parameter(torch.randn(rank, weight.shape[1]) * 0.01)
        self.lora_b = nn.Parameter(torch.zeros(weight.shape[0], rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.T) @ self.lora_b.T


def build(kind: str, layers: int, dim: int, rank: int, tile_numel: int | None) -> nn.Module:
    from engine.lora import ModuLoRALinear
    from engine.quant import RTNQuantizer

    torch.manual_seed(0)
    modules: list[nn.Module] = []
    for _ in range(layers):
        weight = torch.randn(dim, dim) / dim**0.5
        if kind == "dense":
            modules.append(DenseLoRA(weight, rank))
        else:
            bits = int(kind.removeprefix("modulora-"))
            qweight = RTNQuantizer(bits=bits, group_size=64).quantize(weight)
            modules.append(ModuLoRALinear(qweight, rank=rank, alpha=rank, tile_numel=tile_numel or None))
        del weight
    return nn.Sequential(*modules)


def child(kind: str, layers: int, dim: int, tokens: int, rank: int, tile_numel: int | None) -> dict[str, float]:
    torch.set_num_threads(2)
    rss = PeakRss()
    stack = build(kind, layers, dim, rank, tile_numel)
    rss.reset()  # trims construction temporaries, so the step's peak starts from what the stack holds
    built = rss.current()
    x = torch.randn(tokens, dim, requires_grad=True)
    stack(x).square().mean().backward()
    peak = rss.peak()
    return {
        "kind": kind,
        "weights_MiB": built / 2**20,
        "step_peak_MiB": peak / 2**20,
        "step_extra_MiB": (peak - built) / 2**20,
    }


def measure(kind: str, layers: int, dim: int, tokens: int, rank: int, tile_numel: int | None = None) -> dict[str, float]:
    """Run :func:`child` in a fresh interpreter and return its figures."""
    args = [sys.executable, __file__, "--child", kind, "--layers", str(layers), "--dim", str(dim),
            "--tokens", str(tokens), "--rank", str(rank)]
    if tile_numel is not None:
        args += ["--tile-numel", str(tile_numel)]
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--tile-numel", type=int, default=None, help="Dequantization tile size; 0 = untiled.")
    parser.add_argument("--child", default=None)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.layers, args.dim, args.tokens, args.rank, args.tile_numel)))
        return
    from engine.lora.linear import TILE_NUMEL

    rows = [measure(kind, args.layers, args.dim, args.tokens, args.rank, TILE_NUMEL["cpu"]) for kind in
            ("dense", "modulora-8", "modulora-4", "modulora-3", "modulora-2")]
    rows.append({**measure("modulora-4", args.layers, args.dim, args.tokens, args.rank, tile_numel=0),
                 "kind": "modulora-4, untiled (whole weight dequantized at once)"})
    dense_peak = rows[0]["step_peak_MiB"]
    header = (f"Forward+backward of {args.layers} layers {args.dim}x{args.dim}, {args.tokens} tokens, "
              f"LoRA rank {args.rank}, float32 compute, RTN group 64; ModuLoRA dequantizes tiles of "
              f"{TILE_NUMEL['cpu']} weights (the default) unless marked. Peak RSS over the post-import baseline.")
    lines = [header, "", "| stack | weights MiB | step peak MiB | step extra MiB | peak vs dense |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['kind']} | {r['weights_MiB']:.0f} | {r['step_peak_MiB']:.0f} | "
                     f"{r['step_extra_MiB']:.0f} | {r['step_peak_MiB'] / dense_peak:.2f}x |")
    table = "\n".join(lines)
    print(table)
    DOCS.mkdir(exist_ok=True)
    (DOCS / "memory.md").write_text(f"# Memory of a ModuLoRA stack\n\n`python bench/memory.py`\n\n{table}\n")


if __name__ == "__main__":
    main()
