"""The GPU check: one prepared script for a lent GPU (about 8 minutes on one H200), writing ``docs/gpu.md``.

1. the ``cuda`` tests (every format's dequantization on the GPU against the CPU, ModuLoRA gradients against
   float64, streamed training equal to resident, copies overlapping compute) and the Triton kernels compiled
   for the GPU against the eager path;
2. a Llama-2-7B-shaped 3-bit directory (random codes, written block by block in the product's own format) and
   one finetune of it through ``modulora finetune --device cuda`` (seq 1024, batch 1, rank 16 on every linear,
   bf16, gradient checkpointing) with the packed weights resident, on the host tier and on the disk tier;
3. the same step with PEFT + bitsandbytes NF4 (QLoRA: double quantization, bf16 compute) and with PEFT bf16
   LoRA on the same shape, data and settings;
4. if time is left, a Llama-65B-shaped 3-bit step (seq 256) on the host tier with the device capped at 24 GiB
   (``torch.cuda.set_per_process_memory_fraction``);

then a table of peak GPU memory (``torch.cuda.max_memory_allocated`` from the start of training) and tokens/s
(median step after the first), with ratios to QLoRA and the planner's prediction for each of our rows.

    python bench/gpu_check.py --work /tmp/gpu --md docs/gpu.md      # on the GPU machine
    python bench/gpu_check.py --work /tmp/g --shape tiny --device cpu  # this script's own dry run on a CPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPES = {  # name -> (built-in config, sequence length); tiny: a CPU dry run of this script
    "7b": ("llama-7b", 1024),
    "65b": ("llama-65b", 256),
    "tiny": ("tiny", 64),
}
CAP_GIB = 24
ROWS = ("resident", "host", "disk", "peft-nf4", "peft-bf16", "65b")


def log(message: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {message}", flush=True)


def config_of(shape: str) -> Any:
    from engine.offload.shapes import load_config

    if shape == "tiny":
        from transformers import LlamaConfig

        return LlamaConfig(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=4, vocab_size=512, torch_dtype="bfloat16", tie_word_embeddings=False)
    return load_config(SHAPES[shape][0], torch_dtype="bfloat16", tie_word_embeddings=False)


def data_file() -> Path:
    from engine.paths import shared_dir

    return shared_dir() / "data" / "tinystories" / "train.txt"


def child_env() -> dict[str, str]:
    """This environment with the repository first on the import path (a GPU machine's own packages kept)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}


def run(cmd: list[str], log_path: Path, timeout: float) -> tuple[int, float]:
    """Run ``cmd``, its output to ``log_path`` (the tail echoed on failure); (exit code, wall seconds)."""
    start = time.perf_counter()
    with open(log_path, "w") as out:
        try:
            rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=child_env(), timeout=timeout,
                                cwd=ROOT).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    wall = time.perf_counter() - start
    if rc != 0:
        log(f"exit {rc} after {wall:.0f} s: {' '.join(cmd[:6])} ...\n" + log_path.read_text()[-3000:])
    return rc, wall


# -- one of our finetunes, through the command users run ---------------------------------------------------


def our_finetune(directory: Path, run_dir: Path, tier: str | None, seq_len: int, steps: int, device: str,
                 cap_gib: float | None, timeout: float) -> dict[str, Any]:
    args = ["finetune", str(directory), "--data", str(data_file()), "--seq-len", str(seq_len), "--limit", str(steps),
            "--batch-size", "1", "--steps", str(steps), "--rank", "16", "--lr", "1e-4", "--warmup", "0",
            "--grad-checkpointing", "--dtype", "bfloat16", "--save-every", "0", "--device", device,
            "--out", str(run_dir)]
    if tier:
        args += ["--offload", tier]
    cap = "" if cap_gib is None else (f"total = torch.cuda.get_device_properties(0).total_memory; "
                                      f"torch.cuda.set_per_process_memory_fraction({cap_gib} * 2**30 / total); ")
    code = f"import sys, torch; {cap}from engine.cli import main; main(sys.argv[1:])"
    rc, wall = run([sys.executable, "-c", code, *args], run_dir.with_suffix(".log"), timeout)
    if rc != 0:
        return {"error": f"exit {rc}", "wall_s": wall}
    report = json.loads((run_dir / "report.json").read_text())
    steps_log = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"peak_bytes": report["placement"].get("peak_allocated_bytes"), "wall_s": wall,
            **step_figures([s["seconds"] for s in steps_log], steps_log[0]["tokens"]),
            "loss": [s["loss"] for s in steps_log], "device": report["placement"]}


def step_figures(seconds: list[float], tokens: int) -> dict[str, Any]:
    timed = seconds[1:] or seconds  # the first step pays for compilation and the allocator's first growth
    step = statistics.median(timed)
    return {"step_s": step, "tokens_per_s": tokens / step, "steps_s": seconds, "tokens_per_step": tokens}


def planned_peak(shape: str, tier: str | None, seq_len: int) -> dict[str, Any] | None:
    """The planner's device peak for one of our rows (``modulora plan``, JSON)."""
    if shape == "tiny":
        return None
    import torch

    total = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else 80 << 30
    args = ["plan", "--model", SHAPES[shape][0], "--device", "cuda", "--device-mem", f"{total >> 20}MiB",
            "--host-mem", "120GiB", "--bits", "3", "--group-size", "64", "--rank", "16", "--seq-len", str(seq_len),
            "--batch", "1", "--tier", tier or "device", "--compute-dtype", "bfloat16", "--optimizer-offload", "no",
            "--json"]
    try:
        out = subprocess.run([sys.executable, "-m", "engine.cli", *args], capture_output=True, text=True, timeout=120,
                             cwd=ROOT, env=child_env())
        return json.loads(out.stdout)
    except Exception as exc:  # the table says so; the measurement still stands
        return {"error": repr(exc)}


# -- PEFT baselines, in a process of their own ----------------------------------------------------------------


def peft_step(kind: str, shape: str, steps: int, device: str, out_json: Path) -> None:
    """PEFT LoRA (r16, alpha 32, every linear) on a random model of ``shape``: bf16 weights, or NF4 (QLoRA)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from engine.data import read_text, token_windows
    from engine.model import open_source
    from engine.paths import shared_dir

    seq_len = SHAPES[shape][1]
    tokenizer = open_source(shared_dir() / "models" / "stories260K.gguf").tokenizer()
    windows = token_windows(tokenizer, read_text(data_file()), seq_len)[:steps]
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = LlamaForCausalLM(config_of(shape))
    torch.set_default_dtype(torch.float32)
    if kind == "nf4":
        import bitsandbytes as bnb

        for layer in model.model.layers:
            for name, linear in list(layer.named_modules()):
                if isinstance(linear, torch.nn.Linear):
                    q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False,
                                          compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4")
                    q.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, compress_statistics=True,
                                                 quant_type="nf4").to(device)
                    owner, _, attr = name.rpartition(".")
                    setattr(layer.get_submodule(owner), attr, q)
        torch.cuda.empty_cache() if device == "cuda" else None
    model.requires_grad_(False)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LINEARS,
                                             task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device == "cuda")
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    seconds, losses = [], []
    for i in range(steps):
        start = time.perf_counter()
        batch = windows[i : i + 1].to(device)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        seconds.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    out_json.write_text(json.dumps({"peak_bytes": peak, **step_figures(seconds, seq_len), "loss": losses}))


def peft_row(kind: str, shape: str, steps: int, device: str, work: Path, timeout: float) -> dict[str, Any]:
    out = work / f"peft-{kind}-{shape}.json"
    rc, wall = run([sys.executable, __file__, "--peft", kind, "--shape", shape, "--steps", str(steps), "--device",
                    device, "--work", str(work)], out.with_suffix(".log"), timeout)
    return {**json.loads(out.read_text()), "wall_s": wall} if rc == 0 else {"error": f"exit {rc}", "wall_s": wall}


# -- the dequantization kernels ------------------------------------------------------------------------------


def kernel_timings(device: str) -> list[dict[str, Any]]:
    """Eager vs Triton dequantization of one 11008 x 4096 matrix (a 7B FFN weight) to bf16, group 64: median
    milliseconds over CUDA events, and the bytes moved (packed in, bf16 out) per second."""
    import torch

    from engine.quant import RTNQuantizer
    from engine.quant.kernels import groupwise_kernel

    rows = []
    weight = torch.randn(11008, 4096, device=device) * 0.02
    for bits in (2, 3, 4):
        q = RTNQuantizer(bits=bits, group_size=64).quantize(weight)
        zeros = q._zero_points(slice(None), 0, q.n_groups)
        moved = q.nbytes + weight.numel() * 2
        row: dict[str, Any] = {"bits": bits}
        for backend in ("eager", "triton"):
            kernel = groupwise_kernel(backend)
            call = lambda: kernel(q.codes, q.scales, zeros, bits, 64, 0, 4096, torch.bfloat16)  # noqa: E731
            row[f"{backend}_ms"] = median_ms(call, device)
            row[f"{backend}_gbps"] = moved / row[f"{backend}_ms"] / 1e6
        rows.append(row)
    return rows


def median_ms(call: Any, device: str, repeats: int = 20) -> float:
    import torch

    for _ in range(3):
        call()
    if device != "cuda":
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            call()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    times = []
    for _ in range(repeats):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        call()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end))
    return statistics.median(times)


# -- the check ------------------------------------------------------------------------------------------------


def write_directory(shape: str, path: Path, device: str) -> float:
    from scale import write_random_directory

    start = time.perf_counter()
    if not (path / "manifest.json").is_file():
        write_random_directory(path, SHAPES[shape][0] if shape != "tiny" else config_of("tiny"), bits=3,
                               group_size=64, device=device)
    return time.perf_counter() - start


def cuda_tests(work: Path, timeout: float) -> dict[str, Any]:
    rc, wall = run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
                    "tests/test_cuda.py", "tests/test_triton_kernels.py"], work / "cuda-tests.log", timeout)
    tail = (work / "cuda-tests.log").read_text().strip().splitlines()
    return {"exit": rc, "wall_s": wall, "summary": tail[-1] if tail else ""}


def gib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def planned_allocated(plan: dict[str, Any] | None) -> int | None:
    """The planner's device peak less its runtime allowance (CUDA context, library workspaces): the part
    ``torch.cuda.max_memory_allocated`` sees."""
    if not plan or "device_peak_bytes" not in plan:
        return None
    runtime = sum(p["nbytes"] for p in plan["parts"] if p["where"] == "device" and p["name"].startswith("runtime:"))
    return plan["device_peak_bytes"] - runtime


def table(results: dict[str, Any]) -> str:
    base = results["rows"].get("peft-nf4 (QLoRA)", {})
    lines = ["| run | peak GPU GiB | planned GiB (allocator) | planned / peak | tokens/s | step s | memory / QLoRA | "
             "speed / QLoRA | loss (first, last) |", "|---|---|---|---|---|---|---|---|---|"]
    for name, row in results["rows"].items():
        if "error" in row:
            lines.append(f"| {name} | {row['error']} | | | | | | |")
            continue
        planned = planned_allocated(row.get("planned"))
        ratio = f"{planned / row['peak_bytes']:.2f}" if planned and row.get("peak_bytes") else "-"
        mem = f"{row['peak_bytes'] / base['peak_bytes']:.2f}" if row.get("peak_bytes") and base.get("peak_bytes") else "-"
        speed = f"{row['tokens_per_s'] / base['tokens_per_s']:.2f}" if base.get("tokens_per_s") else "-"
        loss = row.get("loss") or [float("nan")]
        lines.append(f"| {name} | {gib(row.get('peak_bytes'))} | {gib(planned)} | {ratio} | {row['tokens_per_s']:.0f} | "
                     f"{row['step_s']:.3f} | {mem} | {speed} | {loss[0]:.3f}, {loss[-1]:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="Scratch directory (model directories, runs).")
    parser.add_argument("--shape", default="7b", choices=[s for s in SHAPES if s != "65b"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--budget", type=float, default=480.0, help="Seconds; later sections are skipped past it.")
    parser.add_argument("--md", type=Path, default=ROOT / "docs" / "gpu.md")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"Rows to run, of {', '.join(ROWS)}.")
    parser.add_argument("--no-tests", action="store_true", help="Skip the cuda tests and the kernel timings.")
    parser.add_argument("--previous", type=Path, help="An earlier run's gpu.json: its parts not run again are kept.")
    parser.add_argument("--json", type=Path, help="Where the results go [WORK/gpu.json]; rewritten after each row.")
    parser.add_argument("--render", type=Path, help="Only write --md from this gpu.json (a run on a GPU machine).")
    parser.add_argument("--peft", choices=("nf4", "bf16"), help=argparse.SUPPRESS)  # one PEFT baseline, then exit
    args = parser.parse_args()
    if args.render:
        rendered = json.loads(args.render.read_text())
        args.md.write_text(render(rendered))
        plot(rendered, args.md.with_suffix(".png"))
        print(args.md.read_text())
        return
    args.work.mkdir(parents=True, exist_ok=True)
    if args.peft:
        peft_step(args.peft, args.shape, args.steps, args.device, args.work / f"peft-{args.peft}-{args.shape}.json")
        return
    began = time.perf_counter()
    left = lambda: args.budget - (time.perf_counter() - began)  # noqa: E731
    rows = args.rows.split(",")
    results: dict[str, Any] = {"environment": environment(), "rows": {}}
    earlier = json.loads(args.previous.read_text()) if args.previous else {}
    json_path = args.json or args.work / "gpu.json"

    def save() -> None:
        """Results so far (an earlier run's parts not run again kept), to JSON and markdown."""
        merged = {**results, "rows": {**earlier.get("rows", {}), **results["rows"]},
                  "seconds": time.perf_counter() - began + earlier.get("seconds", 0.0)}
        for key in ("cuda_tests", "kernels"):
            merged.setdefault(key, earlier.get(key))
        json_path.write_text(json.dumps(merged, indent=1))
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(render(merged))
        plot(merged, args.md.with_suffix(".png"))

    log(json.dumps(results["environment"]))
    if args.device == "cuda" and not args.no_tests:
        results["cuda_tests"] = cuda_tests(args.work, min(150, left()))
        log(f"cuda tests: {results['cuda_tests']}")
    if args.device == "cuda" and not args.no_tests:
        try:
            results["kernels"] = kernel_timings(args.device) if args.device == "cuda" else []
        except Exception as exc:  # reported, and the rest still runs
            results["kernels"] = [{"error": repr(exc)}]
        log(f"kernels: {results['kernels']}")
    save()
    seq_len = SHAPES[args.shape][1]
    directory = args.work / f"q{args.shape}"
    results["write_s"] = write_directory(args.shape, directory, args.device)
    log(f"wrote {directory} in {results['write_s']:.0f} s")
    for tier in [t for t in (None, "host", "disk") if (t or "resident") in rows]:
        name = f"ModuLoRA 3-bit, {tier or 'resident'}"
        row = our_finetune(directory, args.work / f"run-{tier or 'resident'}", tier, seq_len, args.steps, args.device,
                           None, max(30, left()))
        row["planned"] = planned_peak(args.shape, tier, seq_len)
        results["rows"][name] = row
        log(f"{name}: {json.dumps({k: v for k, v in row.items() if k != 'planned'})[:400]}")
        save()
    for kind, name in [(k, n) for k, n in (("nf4", "peft-nf4 (QLoRA)"), ("bf16", "peft-bf16 LoRA"))
                       if f"peft-{k}" in rows]:
        if left() < 40:
            results["rows"][name] = {"error": "skipped: out of time"}
            continue
        results["rows"][name] = peft_row(kind, args.shape, args.steps, args.device, args.work, max(30, left()))
        log(f"{name}: {json.dumps(results['rows'][name])[:400]}")
        save()
    if "65b" in rows and args.device == "cuda" and args.shape == "7b" and left() > 200:
        results["write_65b_s"] = write_directory("65b", args.work / "q65b", args.device)
        name = f"65B ModuLoRA 3-bit, host tier, device capped at {CAP_GIB} GiB (seq 256)"
        row = our_finetune(args.work / "q65b", args.work / "run-65b", "host", SHAPES["65b"][1], 3, args.device,
                           CAP_GIB, max(30, left()))
        row["planned"] = planned_peak("65b", "host", SHAPES["65b"][1])
        results["rows"][name] = row
        log(f"{name}: {json.dumps({k: v for k, v in row.items() if k != 'planned'})[:400]}")
    save()
    print(args.md.read_text())


def plot(results: dict[str, Any], path: Path) -> None:
    """Peak GPU memory and tokens/s of every row, side by side (``path``: a PNG beside the table)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {name: r for name, r in results["rows"].items() if "error" not in r and r.get("peak_bytes")}
    if not rows:
        return
    fig, (mem, speed) = plt.subplots(1, 2, figsize=(11, 0.6 * len(rows) + 1.5), sharey=True)
    names = list(rows)
    mem.barh(names, [rows[n]["peak_bytes"] / 2**30 for n in names], color="tab:blue")
    mem.set_xlabel("peak GPU memory (GiB, max_memory_allocated)")
    speed.barh(names, [rows[n]["tokens_per_s"] for n in names], color="tab:orange")
    speed.set_xlabel("tokens/s (median step)")
    mem.invert_yaxis()
    fig.suptitle(f"7B-shaped finetune step on {results['environment'].get('gpu', 'no GPU')} (bench/gpu_check.py)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def environment() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    for package in ("triton", "bitsandbytes", "peft", "transformers"):
        try:
            info[package] = __import__(package).__version__
        except Exception as exc:  # a missing package is reported, not fatal
            info[package] = f"missing ({type(exc).__name__})"
    return info


def render(results: dict[str, Any]) -> str:
    env = results["environment"]
    out = ["# GPU check (`bench/gpu_check.py`)", "",
           f"Measured on {env.get('gpu', 'no GPU')} ({env.get('gpu_memory_gib', '-')} GiB), torch {env['torch']} "
           f"(CUDA {env['cuda']}), Triton {env['triton']}, bitsandbytes {env['bitsandbytes']}, PEFT {env['peft']}, "
           f"transformers {env['transformers']}; {results['seconds']:.0f} s in all.", ""]
    if results.get("cuda_tests"):
        t = results["cuda_tests"]
        out += [f"CUDA tests (`pytest -m cuda tests/test_cuda.py tests/test_triton_kernels.py`): exit {t['exit']}, "
                f"{t['summary']} ({t['wall_s']:.0f} s).", ""]
    out += ["Every row: one finetune step at batch 1, rank 16 on all seven linears of every block (alpha 32), "
            "bf16 compute, gradient checkpointing, fused AdamW on the GPU; tokens/s is the median step after the "
            "first. Peak is `torch.cuda.max_memory_allocated` from the start of training (the weights included). "
            "Ours run `modulora finetune --device cuda` on a random 3-bit (group 64) directory; PEFT's build the "
            "same shape in bf16 with random weights (QLoRA: bitsandbytes NF4, double quantization). Planned is "
            "`modulora plan --device cuda` for the same settings less its runtime allowance (CUDA context, library "
            "workspaces), which `max_memory_allocated` does not see.", "",
            table(results), "", "![peak memory and tokens/s](gpu.png)", ""]
    kernels = [k for k in results.get("kernels") or [] if "error" not in k]
    if kernels:
        out += ["Dequantization of one 11008 x 4096 weight (group 64) to bf16: median of 20 timed calls (CUDA "
                "events); GB/s counts the packed bytes read and the bf16 bytes written.", "",
                "| bits | eager ms | eager GB/s | Triton ms | Triton GB/s | speed-up |", "|---|---|---|---|---|---|"]
        out += [f"| {k['bits']} | {k['eager_ms']:.3f} | {k['eager_gbps']:.0f} | {k['triton_ms']:.3f} | "
                f"{k['triton_gbps']:.0f} | {k['eager_ms'] / k['triton_ms']:.1f}x |" for k in kernels]
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    try:
        main()
    except Exception:
        traceback.print_exc()
        sys.exit(1)
