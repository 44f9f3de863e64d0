"""One full training step of a Llama-65B-shaped model whose 3-bit weights stream from disk.

The model has Llama-65B's exact shapes (hidden 8192, FFN 22016, 64 heads, 80
layers, vocab 32000).  Its packed weights are random codes and scales written
straight to one file per block (no float copy of 65B weights is ever made);
embeddings, norms and lm_head are bfloat16 (on the disk tier the embeddings and
lm_head are on disk too, as ``modulora finetune --offload disk`` puts them);
LoRA r=16 on every decoder linear, gradient checkpointing, the trainer's
vocabulary-tiled loss, bfloat16 compute, DeepSpeed CPU Adam.  One step is
forward, backward and optimizer, after which it reports peak RSS over the
post-import baseline (high-water mark reset after building), bytes read and
time against the floor max(disk read time, matmul time) measured here.

    python bench/llama65b_step.py                       # the full 80 layers (about 24 GB of block files)
    python bench/llama65b_step.py --layers 4            # the shortened variant
    python bench/llama65b_step.py --model llama-7b --layers 4 --seq-len 1024 --warmup 1 --compare-resident
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.offload import BlockStreamer, DeviceStore, DiskStore, offload_vocab_tables  # noqa: E402
from engine.offload.shapes import load_config, model_shapes  # noqa: E402
from engine.procstat import PeakRss, disk_read_bytes  # noqa: E402
from engine.model import add_lora, lora_parameters  # noqa: E402
from engine.train import chunked_causal_lm_loss  # noqa: E402
from synthetic import build_random_quantized  # noqa: E402  (bench/synthetic.py)

DOCS = Path(__file__).resolve().parent.parent / "docs"


def matmul_gflops(hidden: int, ffn: int, tokens: int, dtype: torch.dtype) -> float:
    """This machine's rate on the step's largest matmul shape."""
    x, w = torch.randn(tokens, hidden, dtype=dtype), torch.randn(ffn, hidden, dtype=dtype)
    x @ w.T
    start, reps = time.perf_counter(), 3
    for _ in range(reps):
        x @ w.T
    return 2 * tokens * hidden * ffn * reps / (time.perf_counter() - start) / 1e9


def disk_read_gbps(store: DiskStore) -> float:
    """Cold sequential read of one block file, as the streamer reads it."""
    start = time.perf_counter()
    store.fetch(0)
    return store.nbytes(0) / (time.perf_counter() - start) / 1e9


def training_step(model: torch.nn.Module, optimizer: Any, tokens: torch.Tensor) -> dict[str, float]:
    times = {}
    start = time.perf_counter()
    loss = chunked_causal_lm_loss(model, {"input_ids": tokens, "labels": tokens})  # the trainer's loss
    times["forward_s"] = time.perf_counter() - start
    loss.backward()
    times["backward_s"] = time.perf_counter() - start - times["forward_s"]
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    times["step_s"] = time.perf_counter() - start
    times["optimizer_s"] = times["step_s"] - times["forward_s"] - times["backward_s"]
    times["loss"] = float(loss)
    return times


def run(args: argparse.Namespace, tier: str, block_dir: Path) -> dict[str, Any]:
    peak = PeakRss()
    overrides = {"num_hidden_layers": args.layers} if args.layers else {}
    config = load_config(args.model, **overrides)
    shapes = model_shapes(config)
    store = DiskStore(block_dir) if tier == "disk" else DeviceStore()
    start = time.perf_counter()
    model = build_random_quantized(config, store, bits=args.bits, group_size=args.group_size, seed=0)
    build_s = time.perf_counter() - start
    model.config.use_cache = False
    add_lora(model, args.rank, 2.0 * args.rank, seed=0, device="cpu")
    streamer = BlockStreamer(model, store, prefetch=args.prefetch)
    if tier == "disk":  # as modulora finetune --offload disk
        offload_vocab_tables(model, block_dir)
    if tier == "device":  # everything resident: no hooks, no fetches
        streamer.materialize()
        streamer.close()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    optimizer = DeepSpeedCPUAdam(list(lora_parameters(model).values()), lr=1e-4, adamw_mode=True)
    tokens = torch.randint(0, config.vocab_size, (1, args.seq_len), generator=torch.Generator().manual_seed(1))
    for _ in range(args.warmup):  # first-call costs (allocator, kernels), and Adam's moments allocated
        training_step(model, optimizer, tokens)
    read_before = disk_read_bytes()
    fetched_before = store.bytes_fetched
    peak.reset()
    result = training_step(model, optimizer, tokens)
    result.update(
        tier=tier,
        peak_rss_gib=peak.peak() / 2**30,
        bytes_fetched_gb=(store.bytes_fetched - fetched_before) / 1e9,
        disk_read_gb=(disk_read_bytes() - read_before) / 1e9,
        build_s=build_s,
        layers=shapes.n_blocks,
        hidden=shapes.hidden_size,
        ffn=shapes.intermediate_size,
        params_b=shapes.total_params / 1e9,
        packed_gb=sum(store.nbytes(i) for i in range(shapes.n_blocks)) / 1e9,
        lora_params_m=sum(p.numel() for p in lora_parameters(model).values()) / 1e6,
    )
    tokens_n = args.seq_len
    linear = shapes.n_blocks * shapes.linear_params_per_block + shapes.vocab_size * shapes.hidden_size
    attention = 4 * tokens_n**2 * shapes.hidden_size * shapes.n_blocks
    # frozen base + checkpointing: forward, recomputed forward, input gradients (the LoRA terms are < 1%)
    result["step_tflop"] = 3 * (2 * linear * tokens_n + attention) / 1e12
    if tier == "disk":
        result["disk_gbps"] = disk_read_gbps(store)
        streamer.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-65b", help="Built-in shape name or config.json.")
    parser.add_argument("--layers", type=int, default=None, help="Keep only this many decoder blocks.")
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--prefetch", type=int, default=1)
    parser.add_argument("--block-dir", type=Path, default=None,
                        help="Where the block files go (reused across runs with the same settings).")
    parser.add_argument("--compare-resident", action="store_true", help="Also run the step fully resident.")
    parser.add_argument("--warmup", type=int, default=0, help="Unmeasured steps before the measured one.")
    parser.add_argument("--doc", default=None, help="Write docs/DOC.md with the result table.")
    args = parser.parse_args()
    torch.manual_seed(0)
    scratch = None
    block_dir = args.block_dir
    if block_dir is None:
        scratch = Path(tempfile.mkdtemp(prefix="modulora-blocks-"))
        block_dir = scratch
    try:
        results = [run(args, "disk", block_dir)]
        if args.compare_resident:
            results.append(run(args, "device", block_dir))
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    gflops = matmul_gflops(results[0]["hidden"], results[0]["ffn"], args.seq_len, torch.bfloat16)
    for r in results:
        r["matmul_gflops"] = gflops
        r["compute_floor_s"] = r["step_tflop"] * 1e3 / gflops
        if "disk_gbps" in results[0]:
            r["disk_floor_s"] = results[0]["bytes_fetched_gb"] / results[0]["disk_gbps"] if r["tier"] == "disk" else 0.0
        r["floor_s"] = max(r["compute_floor_s"], r.get("disk_floor_s", 0.0))
        r["step_over_floor"] = r["step_s"] / r["floor_s"]
    print(json.dumps(results, indent=2))
    if args.doc:
        write_doc(args, results)


def write_doc(args: argparse.Namespace, results: list[dict[str, Any]]) -> None:
    keys = [("tier", "{}"), ("layers", "{}"), ("params_b", "{:.1f}"), ("packed_gb", "{:.2f}"),
            ("lora_params_m", "{:.0f}"), ("peak_rss_gib", "{:.2f}"), ("bytes_fetched_gb", "{:.2f}"),
            ("disk_read_gb", "{:.2f}"), ("forward_s", "{:.0f}"), ("backward_s", "{:.0f}"), ("optimizer_s", "{:.1f}"),
            ("step_s", "{:.0f}"), ("compute_floor_s", "{:.0f}"), ("disk_floor_s", "{:.0f}"), ("step_over_floor", "{:.2f}")]
    lines = ["| " + " | ".join(k for k, _ in keys) + " |", "|" + "---|" * len(keys)]
    for r in results:
        lines.append("| " + " | ".join(fmt.format(r[k]) if k in r else "-" for k, fmt in keys) + " |")
    argv = " ".join(sys.argv[1:])
    text = (f"# Offloaded training step: {args.model} shapes, {args.bits}-bit, disk tier\n\n"
            f"`python bench/llama65b_step.py {argv}`\n\n"
            f"Sequence {args.seq_len}, batch 1, LoRA r={args.rank} on every decoder linear, gradient checkpointing, "
            f"bfloat16 compute, prefetch {args.prefetch}, DeepSpeed CPU Adam, {args.warmup} warm-up step(s) before the measured one. Peak RSS is the high-water mark "
            "during the step over the post-import baseline. The floor is max(disk read of the bytes fetched at the "
            "cold-read rate measured here, step matmul FLOPs at the bf16 rate measured here).\n\n"
            + "\n".join(lines) + "\n\nRaw:\n\n```json\n" + json.dumps(results, indent=2) + "\n```\n")
    DOCS.mkdir(exist_ok=True)
    (DOCS / f"{args.doc}.md").write_text(text)


if __name__ == "__main__":
    main()
