"""Memory and speed of LoRA finetuning: PEFT (float32, bfloat16, bitsandbytes NF4) against this engine.

One run on this machine measures every system on the same Llama-shaped model with
random weights (``LlamaConfig`` + ``LlamaForCausalLM``, built from one seed):

* ``peft-fp32`` / ``peft-bf16``: PEFT LoRA on the float32 model / on the model cast to bfloat16;
* ``peft-nf4``: QLoRA, PEFT over bitsandbytes NF4 (double quantization, CPU backend, float32 compute),
  loaded with ``from_pretrained(quantization_config=...)`` and ``prepare_model_for_kbit_training``;
* ``engine-B[-TIER][-fp32]``: ModuLoRA layers over the same weights RTN-quantized at B bits (group 64),
  resident or with the packed blocks on the ``host`` or ``disk`` tier (``BlockStreamer``, prefetch 1);
  bfloat16 compute, embeddings, norms and lm_head unless ``-fp32``.

The engine trains with its chunked loss (``engine.train.losses``), PEFT with the
model's own; ``engine-...-hfloss`` and ``peft-...-chunked`` swap them, to show what
each part contributes.  Every system: LoRA rank 16 (alpha 32, no dropout) on q, k,
v, o, gate, up and down of every block, gradient checkpointing (non-reentrant),
torch ``AdamW`` on the adapters, batch 1, sequence 512.  Each runs in a fresh
interpreter (``--child SYSTEM``): the baseline RSS is taken after the imports, the
high-water mark is reset after the model is built (``engine.procstat.PeakRss``), so
the peak is the training phase's (model included) over the post-import baseline;
throughput is training tokens/s over the measured steps after the warm-up ones.

The document also holds dequantization throughput (``bench/dequant.py``'s
``measure``), DeepSpeed CPU Adam against torch AdamW on LoRA-sized parameter sets,
and the cost of one QDyLoRA run against fixed-rank runs (``bench/qdylora.py``'s
runs).  Prints the document and writes ``docs/benchmarks.md`` and ``docs/benchmarks.png``.

    python bench/compare.py --allocator-check --profile-systems engine-3,peft-bf16   # the full run
    python bench/compare.py --sizes 39m --steps 2 --repeats 1 --skip-sections         # a quick look
    python bench/compare.py --child engine-3 --size 134m --profile                    # one system, profiled
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import DOCS, REPO, table, work_dir, write_doc

DEFAULT_SYSTEMS = ("peft-fp32", "peft-bf16", "peft-nf4", "engine-4", "engine-3", "engine-2", "engine-3-host",
                   "engine-3-disk", "engine-3-fp32", "engine-3-hfloss", "peft-bf16-chunked")
PEFT_SYSTEM = re.compile(r"(?P<base>peft-(?:fp32|bf16|nf4))(?P<chunked>-chunked)?")
ENGINE_SYSTEM = re.compile(r"engine-(?P<bits>[2348])(?:-(?P<tier>host|disk))?(?P<fp32>-fp32)?(?P<hfloss>-hfloss)?")
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class Shape:
    """A Llama-proportioned model: head dim 64, FFN about 8/3 of hidden, vocabulary 32000."""

    hidden: int
    layers: int
    ffn: int
    heads: int
    vocab: int = 32000

    @property
    def params(self) -> int:
        block = 4 * self.hidden**2 + 3 * self.hidden * self.ffn + 2 * self.hidden
        return self.layers * block + 2 * self.vocab * self.hidden + self.hidden

    def describe(self) -> str:
        return f"hidden {self.hidden}, {self.layers} layers, FFN {self.ffn}, {self.heads} heads, vocab {self.vocab}"


SIZES = {
    "39m": Shape(hidden=384, layers=8, ffn=1024, heads=6),
    "134m": Shape(hidden=768, layers=12, ffn=2048, heads=12),
    "368m": Shape(hidden=1024, layers=24, ffn=2816, heads=16),
}


# -- one system, in a child process --------------------------------------------------------------


def llama_config(shape: Shape, seq_len: int) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=shape.hidden, intermediate_size=shape.ffn, num_hidden_layers=shape.layers,
                       num_attention_heads=shape.heads, num_key_value_heads=shape.heads, vocab_size=shape.vocab,
                       max_position_embeddings=seq_len, use_cache=False, tie_word_embeddings=False)


def float_model(shape: Shape, seq_len: int) -> Any:
    """The float32 model every system starts from: the same weights in every child."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(llama_config(shape, seq_len)).eval()


def lora_config(rank: int) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=TARGET_MODULES,
                      task_type="CAUSAL_LM")


def checkpointing(model: Any) -> None:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def build_peft(system: str, shape: Shape, seq_len: int, rank: int, work: Path) -> tuple[Any, dict[str, Any]]:
    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training

    model = float_model(shape, seq_len)
    if system == "peft-bf16":
        model = model.to(torch.bfloat16)
    if system == "peft-nf4":
        from transformers import BitsAndBytesConfig, LlamaForCausalLM

        logging_quiet()
        source = work / "float-model"
        model.save_pretrained(source)
        del model
        gc.collect()
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.float32)
        model = LlamaForCausalLM.from_pretrained(source, quantization_config=quant, device_map="cpu",
                                                 dtype=torch.float32)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        checkpointing(model)
    model = get_peft_model(model, lora_config(rank))
    return model, {}


def logging_quiet() -> None:
    import logging

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def build_engine(system: str, shape: Shape, seq_len: int, rank: int, work: Path, prefetch: int) -> tuple[Any, dict[str, Any]]:
    import torch

    from engine.model import add_lora, lora_layers, quantize_model
    from engine.offload import BlockStreamer, make_store, offload_vocab_tables
    from engine.quant import make_quantizer

    match = ENGINE_SYSTEM.fullmatch(system)
    bits, tier = int(match["bits"]), match["tier"]
    dtype = torch.float32 if match["fp32"] else torch.bfloat16
    model = float_model(shape, seq_len)
    quantize_model(model, make_quantizer("rtn", bits=bits, group_size=64))
    if dtype != torch.float32:  # embeddings, norms, lm_head: the float parts outside the packed weights
        for param in model.parameters():
            param.data = param.data.to(dtype)
    add_lora(model, rank, alpha=2 * rank, seed=0)
    for layer in lora_layers(model).values():
        layer.compute_dtype = dtype
    info: dict[str, Any] = {}
    if tier is not None:
        store = make_store(tier, directory=work / f"blocks-{system}")
        info["streamer"] = BlockStreamer(model, store, prefetch=prefetch)
        if tier == "disk":
            offload_vocab_tables(model, store.directory)
    checkpointing(model)
    return model, info


def uses_chunked_loss(system: str) -> bool:
    """PEFT systems use the model's own loss unless ``-chunked``; the engine's the chunked one unless ``-hfloss``."""
    peft_match = PEFT_SYSTEM.fullmatch(system)
    if peft_match is not None:
        return peft_match["chunked"] is not None
    return ENGINE_SYSTEM.fullmatch(system)["hfloss"] is None


def train_step(model: Any, optimizer: Any, tokens: Any, chunked: bool) -> float:
    from engine.train.losses import chunked_causal_lm_loss

    batch = {"input_ids": tokens, "labels": tokens}
    loss = chunked_causal_lm_loss(model, batch) if chunked else model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def child(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import transformers  # noqa: F401  (every child imports the same libraries before the baseline)
    import peft  # noqa: F401
    import bitsandbytes  # noqa: F401

    import engine.offload  # noqa: F401
    import engine.train  # noqa: F401
    from engine.procstat import PeakRss, disk_read_bytes

    torch.set_num_threads(args.threads)
    shape = SIZES[args.size]
    rss = PeakRss()
    start = time.perf_counter()
    if PEFT_SYSTEM.fullmatch(args.child) is None and ENGINE_SYSTEM.fullmatch(args.child) is None:
        raise SystemExit(f"unknown system {args.child!r}")
    chunked = uses_chunked_loss(args.child)
    if args.child.startswith("peft-"):
        model, info = build_peft(PEFT_SYSTEM.fullmatch(args.child)["base"], shape, args.seq_len, args.rank, args.work)
    else:
        model, info = build_engine(args.child, shape, args.seq_len, args.rank, args.work, args.prefetch)
    model.train()
    build_s = time.perf_counter() - start
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    tokens = torch.randint(0, shape.vocab, (1, args.seq_len), generator=torch.Generator().manual_seed(1))
    gc.collect()
    rss.reset()
    loaded = rss.current()
    losses = [train_step(model, optimizer, tokens, chunked) for _ in range(args.warmup)]
    read_before = disk_read_bytes()
    seconds = []
    profiler = profile_start(args)
    cpu_before, load_before, machine_before = os.times(), os.getloadavg()[0], machine_cpu()
    for _ in range(args.steps):
        t0 = time.perf_counter()
        losses.append(train_step(model, optimizer, tokens, chunked))
        seconds.append(time.perf_counter() - t0)
    cpu_after, machine_after = os.times(), machine_cpu()
    profile_stop(profiler, args)
    peak = rss.peak()
    streamer = info.get("streamer")
    cpu_s = cpu_after.user + cpu_after.system - cpu_before.user - cpu_before.system
    result = {
        "system": args.child,
        "size": args.size,
        "params_m": shape.params / 1e6,
        "lora_params_m": sum(p.numel() for p in params) / 1e6,
        "build_s": build_s,
        "loaded_mib": loaded / 2**20,
        "peak_mib": peak / 2**20,
        "step_s": seconds,
        "tokens_per_s": args.seq_len * len(seconds) / sum(seconds),
        "losses": losses,
        "disk_read_mb": (disk_read_bytes() - read_before) / 1e6,
        "cpu_busy": cpu_s / (sum(seconds) * args.threads),
        # CPU seconds the rest of the machine used (other processes, and the hypervisor's steal) per second of
        # the measured steps: 0 on a quiet machine, up to the core count when something else ran flat out
        "others_cpu": (machine_after[0] - machine_before[0] - cpu_s) / sum(seconds),
        "steal_cpu": (machine_after[1] - machine_before[1]) / sum(seconds),
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
    }
    if streamer is not None:
        result["max_blocks_resident"] = streamer.max_resident
        result["fetched_mb_per_step"] = streamer.store.bytes_fetched / (args.warmup + args.steps) / 1e6
    if args.tensor_peak:
        result["tensor_peak_mib"] = tensor_peak(model, optimizer, tokens, chunked, args.work) / 2**20
    if streamer is not None:
        streamer.close()
    return result


def machine_cpu() -> tuple[float, float]:
    """Seconds of CPU every process on the machine has used (user, nice, system, irq, softirq), and steal."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    return (fields[0] + fields[1] + fields[2] + fields[5] + fields[6]) / tick, fields[7] / tick


def tensor_peak(model: Any, optimizer: Any, tokens: Any, chunked: bool, work: Path) -> float:
    """Bytes of live tensors at the peak of one more step (parameters, optimizer state, activations,
    temporaries), from torch's memory timeline: what the process would hold with no allocator overhead."""
    import warnings

    import torch.profiler

    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True, record_shapes=True, with_stack=True) as prof:
        train_step(model, optimizer, tokens, chunked)
    path = work / "memory_timeline.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prof.export_memory_timeline(str(path), device="cpu")
    _, sizes = json.loads(path.read_text())
    return max(sum(row) for row in sizes)


def profile_start(args: argparse.Namespace) -> Any:
    if not args.profile:
        return None
    import torch.profiler

    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=False)
    prof.__enter__()
    return prof


def profile_stop(prof: Any, args: argparse.Namespace) -> None:
    """Print the profile; with ``--profile-out``, write the top operators by self CPU time as JSON."""
    if prof is None:
        return
    prof.__exit__(None, None, None)
    averages = prof.key_averages()
    print(averages.table(sort_by="self_cpu_time_total", row_limit=args.profile_rows), file=sys.stderr)
    if args.profile_out:
        ops = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in averages)
        rows = [{"name": e.key, "self_ms_per_step": e.self_cpu_time_total / 1e3 / args.steps,
                 "calls_per_step": e.count / args.steps, "share": e.self_cpu_time_total / total}
                for e in ops[: args.profile_rows]]
        Path(args.profile_out).write_text(json.dumps({"total_ms_per_step": total / 1e3 / args.steps, "ops": rows}))


# -- the parent: every system in a fresh child, then the document ----------------------------------


def child_command(args: argparse.Namespace, system: str, size: str, work: Path, *extra: str) -> list[str]:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", system, "--size", size,
               "--seq-len", str(args.seq_len), "--rank", str(args.rank), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--prefetch", str(args.prefetch), "--threads", str(args.threads),
               "--work", str(work), *extra]
    return command


def shown(command: list[str], work: Path) -> str:
    text = shlex.join(["python", "bench/compare.py", *command[2:]])
    return text.replace(str(work), "$WORK")


def wait_for_quiet(max_wait: float, threshold: float = 0.3) -> float:
    """Wait (up to ``max_wait`` seconds) until the rest of the machine uses under ``threshold`` cores; the
    seconds waited.  This process is idle meanwhile, so all busy CPU is someone else's."""
    start = time.perf_counter()
    while True:
        before, t0 = machine_cpu()[0], time.perf_counter()
        time.sleep(1.0)
        busy = (machine_cpu()[0] - before) / (time.perf_counter() - t0)
        waited = time.perf_counter() - start
        if busy < threshold or waited >= max_wait:
            return waited
        time.sleep(3.0)


def run_child(args: argparse.Namespace, system: str, size: str, work: Path, commands: list[str],
              *extra: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    waited = wait_for_quiet(args.wait_quiet) if args.wait_quiet else 0.0
    child_work = work / f"{size}-{system}"
    child_work.mkdir(parents=True, exist_ok=True)
    command = child_command(args, system, size, child_work, *extra)
    commands.append(" ".join(f"{k}={v}" for k, v in (env or {}).items()) + (" " if env else "") + shown(command, work))
    print(f"$ {commands[-1]}", file=sys.stderr, flush=True)
    env = {**os.environ, "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"child failed ({done.returncode}): {commands[-1]}\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["waited_s"] = waited
    print(f"  peak {result['peak_mib']:.0f} MiB, {result['tokens_per_s']:.0f} tokens/s, others' CPU "
          f"{result['others_cpu'] + result['steal_cpu']:.2f} cores (waited {waited:.0f} s for a quiet machine)",
          file=sys.stderr, flush=True)
    return result


def best_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Throughput from the least disturbed repeat (highest tokens/s), memory the highest peak of all repeats."""
    best = dict(max(runs, key=lambda r: r["tokens_per_s"]))
    best["peak_mib"] = max(r["peak_mib"] for r in runs)
    best["peaks_mib"] = [r["peak_mib"] for r in runs]
    best["tokens_per_s_runs"] = [r["tokens_per_s"] for r in runs]
    tensor_peaks = [r["tensor_peak_mib"] for r in runs if "tensor_peak_mib" in r]
    if tensor_peaks:
        best["tensor_peak_mib"] = max(tensor_peaks)
    return best


def describe_system(system: str) -> str:
    peft_match = PEFT_SYSTEM.fullmatch(system)
    if peft_match is not None:
        base = {"peft-fp32": "PEFT LoRA, float32 model", "peft-bf16": "PEFT LoRA, bfloat16 model",
                "peft-nf4": "PEFT + bitsandbytes NF4 (QLoRA)"}[peft_match["base"]]
        return base + (", engine's chunked loss" if peft_match["chunked"] else "")
    match = ENGINE_SYSTEM.fullmatch(system)
    text = f"engine, {match['bits']}-bit RTN g64"
    text += {None: ", resident", "host": ", host tier", "disk": ", disk tier"}[match["tier"]]
    text += ", float32" if match["fp32"] else ", bfloat16"
    return text + (", model's own loss" if match["hfloss"] else "")


def results_table(rows: dict[str, dict[str, Any]]) -> str:
    bf16, nf4 = rows.get("peft-bf16"), rows.get("peft-nf4")
    headers = ["system", "what", "peak MiB", "vs bf16 LoRA", "vs NF4 QLoRA", "tokens/s", "vs bf16 LoRA",
               "vs NF4 QLoRA", "model MiB", "live tensors MiB", "loss after"]
    out = []
    for system, r in rows.items():
        ratio = lambda key, ref: f"{r[key] / ref[key]:.2f}x" if ref else "-"  # noqa: E731
        out.append([f"`{system}`", describe_system(system), f"{r['peak_mib']:.0f}", ratio("peak_mib", bf16),
                    ratio("peak_mib", nf4), f"{r['tokens_per_s']:.0f}", ratio("tokens_per_s", bf16),
                    ratio("tokens_per_s", nf4), f"{r['loaded_mib']:.0f}",
                    f"{r['tensor_peak_mib']:.0f}" if "tensor_peak_mib" in r else "-", f"{r['losses'][-1]:.4f}"])
    return table(headers, out)


TARGETS = [  # (system, reference, quantity, bound): system's quantity <= / >= bound x reference's
    ("engine-3", "peft-nf4", "peak_mib", 0.5),
    ("engine-3", "peft-bf16", "peak_mib", 0.75),
    ("engine-4", "peft-bf16", "peak_mib", 0.75),
    ("engine-2", "peft-bf16", "peak_mib", 0.75),
    ("engine-4", "peft-nf4", "peak_mib", 0.5),
    ("engine-2", "peft-nf4", "peak_mib", 0.5),
    ("engine-3-disk", "peft-bf16", "peak_mib", 0.3),
    ("engine-3", "peft-nf4", "tokens_per_s", 1.2),
    ("engine-3", "peft-bf16", "tokens_per_s", 0.8),
    ("engine-4", "peft-nf4", "tokens_per_s", 1.2),
    ("engine-4", "peft-bf16", "tokens_per_s", 0.8),
    ("engine-2", "peft-nf4", "tokens_per_s", 1.2),
    ("engine-2", "peft-bf16", "tokens_per_s", 0.8),
]


def targets_table(rows: dict[str, dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    out, verdicts = [], []
    for system, reference, key, bound in TARGETS:
        if system not in rows or reference not in rows:
            continue
        ratio = rows[system][key] / rows[reference][key]
        met = ratio <= bound if key == "peak_mib" else ratio >= bound
        what = "peak memory" if key == "peak_mib" else "throughput"
        sign = "<=" if key == "peak_mib" else ">="
        verdicts.append({"system": system, "reference": reference, "what": what, "ratio": ratio, "bound": bound,
                         "met": met})
        out.append([f"`{system}` {what} vs `{reference}`", f"{sign} {bound}x", f"{ratio:.2f}x",
                    "met" if met else "**missed**"])
    return table(["target", "bound", "measured", ""], out), verdicts


def plot(results: dict[str, dict[str, dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(results)
    fig, axes = plt.subplots(len(sizes), 2, figsize=(11, 3.2 * len(sizes)), squeeze=False)
    for row, size in enumerate(sizes):
        systems = list(results[size])
        colors = ["tab:gray" if s.startswith("peft") else "tab:blue" for s in systems]
        for col, (key, label) in enumerate((("peak_mib", "peak training RSS, MiB"), ("tokens_per_s", "tokens/s"))):
            ax = axes[row][col]
            values = [results[size][s][key] for s in systems]
            ax.barh(systems, values, color=colors)
            for i, value in enumerate(values):
                ax.text(value, i, f" {value:.0f}", va="center", fontsize=7)
            ax.invert_yaxis()
            ax.set_xlabel(label)
            ax.set_title(f"{size} ({SIZES[size].describe()})", fontsize=8)
            ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def lora_shapes(shape: Shape, rank: int) -> list[tuple[int, int]]:
    """Every adapter tensor of rank-``rank`` LoRA on the seven decoder linears of every block."""
    h, f = shape.hidden, shape.ffn
    linears = [(h, h)] * 4 + [(h, f), (h, f), (f, h)]  # (in, out): q k v o, gate up, down
    out = []
    for _ in range(shape.layers):
        for n_in, n_out in linears:
            out += [(rank, n_in), (n_out, rank)]
    return out


def optimizer_bench(shape: Shape, rank: int, steps: int, threads: int) -> list[dict[str, Any]]:
    """Milliseconds per optimizer step over LoRA-shaped float32 parameters with fixed gradients."""
    import torch
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    makers = {
        "torch AdamW (for-loop; the trainer's default)": lambda ps: torch.optim.AdamW(ps, lr=1e-4, foreach=False),
        "torch AdamW foreach=True": lambda ps: torch.optim.AdamW(ps, lr=1e-4, foreach=True),
        "torch AdamW fused=True": lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True),
        "DeepSpeed CPU Adam (adamw_mode)": lambda ps: DeepSpeedCPUAdam(ps, lr=1e-4, adamw_mode=True),
    }
    rows = []
    for name, make in makers.items():
        params = []
        for size in lora_shapes(shape, rank):
            param = torch.nn.Parameter(torch.randn(size, generator=gen) * 0.01)
            param.grad = torch.randn(size, generator=gen) * 1e-3
            params.append(param)
        optimizer = make(params)
        for _ in range(2):  # state allocated, first-call costs
            optimizer.step()
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            optimizer.step()
            times.append(time.perf_counter() - t0)
        rows.append({"optimizer": name, "params_m": sum(p.numel() for p in params) / 1e6, "tensors": len(params),
                     "ms": 1e3 * statistics.median(times), "ms_best": 1e3 * min(times)})
        del optimizer, params
    return rows


def qdylora_cost(args: argparse.Namespace, work: Path) -> tuple[str, list[str]]:
    """One dynamic-rank run evaluated at every rank against one fixed-rank run per rank (bench/qdylora.py's runs)."""
    from _common import GGUF, VALID_TXT, Cli
    from qdylora import finetune

    ranks = sorted(int(r) for r in args.qdylora_ranks.split(","))
    cli = Cli(work / "qdylora", threads=1)
    base = cli.work / "base"
    cli.run("quantize", GGUF, "--method", "rtn", "--bits", 3, "--out", base)
    steps = args.qdylora_steps
    dynamic = finetune(cli, base, cli.work / "dynamic", steps, "--rank-max", ranks[-1], "--dynamic")
    out, eval_wall = cli.run("eval", cli.work / "dynamic", "--data", VALID_TXT, "--json", "--ranks",
                             ",".join(map(str, ranks)))
    dynamic_ppl = {int(r): v["ppl"] for r, v in json.loads(out.strip().splitlines()[-1])["ranks"].items()}
    fixed_train = fixed_wall = 0.0
    fixed_ppl = {}
    for rank in ranks:
        times = finetune(cli, base, cli.work / f"rank-{rank}", steps, "--rank", rank)
        out, wall = cli.run("eval", cli.work / f"rank-{rank}", "--data", VALID_TXT, "--json")
        fixed_ppl[rank] = json.loads(out.strip().splitlines()[-1])["ppl"]
        fixed_train += times["train"]
        fixed_wall += times["wall"] + wall
    rows = [
        ["one dynamic run (rank_max " + str(ranks[-1]) + ") + one eval at every rank", 1,
         f"{dynamic['train']:.1f}", f"{dynamic['wall'] + eval_wall:.1f}", "1.00x"],
        [f"{len(ranks)} fixed-rank runs + their evals", len(ranks), f"{fixed_train:.1f}", f"{fixed_wall:.1f}",
         f"{fixed_wall / (dynamic['wall'] + eval_wall):.2f}x"],
    ]
    quality = [[r, f"{dynamic_ppl[r]:.3f}", f"{fixed_ppl[r]:.3f}"] for r in ranks]
    text = (f"The shared stories260K model quantized to 3-bit RTN; every run `modulora finetune` on "
            f"`tinystories/train.txt` for {steps} steps (the CLI's default batch and learning rate), one thread. "
            f"Ranks {', '.join(map(str, ranks))}; `train s` is the training loop alone (from `report.json`), "
            "`total s` every command's wall time including interpreter start, model loading and evaluation.\n\n"
            + table(["approach", "training runs", "train s", "total s", "total vs dynamic"], rows)
            + "\n\nPerplexity on `valid.txt` (short runs: a cost comparison, see [qdylora.md](qdylora.md) for "
              "quality at 150 steps):\n\n" + table(["rank", "dynamic run at this rank", "fixed-rank run"], quality))
    return text, cli.commands


def parent(args: argparse.Namespace) -> None:
    sizes = args.sizes.split(",")
    plan = {size: args.systems.split(",") for size in sizes}
    for item in args.size_systems:
        size, _, listed = item.partition("=")
        plan[size] = listed.split(",")
    for size, systems in plan.items():
        if size not in SIZES:
            raise SystemExit(f"unknown size {size!r}; known: {', '.join(SIZES)}")
        for system in systems:
            if PEFT_SYSTEM.fullmatch(system) is None and ENGINE_SYSTEM.fullmatch(system) is None:
                raise SystemExit(f"unknown system {system!r}")
    commands: list[str] = []
    started = time.perf_counter()
    with work_dir(args.work, "compare") as work:
        runs: dict[str, dict[str, list[dict[str, Any]]]] = {size: {s: [] for s in plan[size]} for size in sizes}
        for size in sizes:
            for repeat in range(args.repeats):
                systems = plan[size] if repeat % 2 == 0 else plan[size][::-1]  # alternate the order
                extra = ("--tensor-peak",) if repeat == 0 else ()
                for system in systems:
                    runs[size][system].append(run_child(args, system, size, work, commands, *extra))
        results = {size: {s: best_of(runs[size][s]) for s in plan[size]} for size in sizes}
        allocator = {}
        if args.allocator_check:  # the same two systems with glibc handing freed memory back at once
            for system in ("peft-bf16", "engine-3-disk"):
                allocator[system] = run_child(args, system, sizes[-1], work, commands, "--tensor-peak",
                                              env=NO_RETENTION)
        profiles = {}
        for system in args.profile_systems.split(",") if args.profile_systems else []:
            profile_path = work / f"{sizes[-1]}-{system}" / "profile.json"
            run_child(args, system, sizes[-1], work, commands, "--profile", "--profile-out", str(profile_path))
            profiles[system] = json.loads(profile_path.read_text())
        sections = {}
        if not args.skip_sections:
            from dequant import markdown as dequant_markdown
            from dequant import measure as dequant_measure

            print("$ dequantization throughput", file=sys.stderr, flush=True)
            sections["dequant"] = dequant_markdown(dequant_measure(args.dequant_dim, 10, args.threads, 64),
                                                   args.dequant_dim, 10, args.threads)
            print("$ optimizers", file=sys.stderr, flush=True)
            sections["optimizers"] = [
                {"shape": name, **row}
                for name in args.optimizer_shapes.split(",")
                for row in optimizer_bench(OPTIMIZER_SHAPES[name], args.rank, args.optimizer_steps, args.threads)
            ]
            sections["qdylora"], qdylora_commands = qdylora_cost(args, work)
            commands += qdylora_commands
        elapsed = time.perf_counter() - started
    DOCS.mkdir(exist_ok=True)
    plot(results, DOCS / "benchmarks.png")
    body = document(args, results, allocator, profiles, sections, elapsed)
    print(body)
    write_doc("benchmarks", "PEFT, QLoRA and this engine: memory and speed on one machine", "compare.py", body,
              commands)


NO_RETENTION = {"MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_MMAP_THRESHOLD_": "131072"}
OPTIMIZER_SHAPES = {**SIZES, "7b": Shape(hidden=4096, layers=32, ffn=11008, heads=32)}


def machine() -> str:
    import platform

    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = Path("/proc/meminfo").read_text().split()[1]
    return (f"{os.cpu_count()} cores ({cpu}), {int(mem) / 2**20:.0f} GiB RAM, torch {torch.__version__}, "
            f"Python {platform.python_version()}")


def versions() -> str:
    from importlib.metadata import version

    return ", ".join(f"{name} {version(name)}" for name in ("transformers", "peft", "bitsandbytes", "deepspeed"))


def document(args: argparse.Namespace, results: dict[str, dict[str, dict[str, Any]]],
             allocator: dict[str, dict[str, Any]], profiles: dict[str, dict[str, Any]], sections: dict[str, Any],
             elapsed: float) -> str:
    parts = [
        f"Measured on {machine()}; {versions()}. The whole run took {elapsed / 60:.1f} min.",
        "## Setup\n\n"
        "A Llama-shaped model with random weights (`LlamaConfig` + `LlamaForCausalLM`, seed 0, untied "
        "embeddings, SDPA attention); every system starts from these same float32 weights. LoRA rank "
        f"{args.rank} (alpha {2 * args.rank}, no dropout) on q, k, v, o, gate, up and down of every block; "
        f"gradient checkpointing (non-reentrant); torch `AdamW` (lr 1e-4) on the adapters; batch 1, sequence "
        f"{args.seq_len}, {args.threads} threads. Each system runs in a fresh interpreter "
        "(`--child SYSTEM`), which imports the same libraries, takes its baseline RSS, builds the model, then "
        "trims the heap and resets the kernel's high-water mark (`engine.procstat.PeakRss`). **peak MiB** is "
        "the high-water mark of the training phase (warm-up and measured steps, so Adam's moments are in) over "
        "the post-import baseline: it includes the model. **model MiB** is the RSS right after building, "
        "over the same baseline. **tokens/s** is "
        f"{args.seq_len} x {args.steps} measured steps / their wall time, after {args.warmup} warm-up step(s). "
        f"Each system ran {args.repeats} time(s), interleaved (the order reversed every other repeat); the "
        "table shows the highest peak of the repeats and the throughput of the fastest repeat. **live tensors "
        "MiB** is the peak of torch's memory timeline over one more step (parameters, optimizer state, "
        "activations and temporaries, no allocator overhead): the difference to the RSS peak is memory glibc's "
        "allocator keeps after frees, thread pools and library caches.\n\n"
        "* `peft-*`: PEFT's `get_peft_model` with `LoraConfig`; `peft-bf16` is the float32 model cast to "
        "bfloat16 (PEFT keeps the adapters float32); `peft-nf4` saves the float32 model and loads it with "
        "`BitsAndBytesConfig(load_in_4bit, nf4, double quantization, compute dtype float32)` on the CPU "
        "backend, then `prepare_model_for_kbit_training`. Without the optional `kernels` package "
        "bitsandbytes' CPU backend dequantizes each weight and runs a dense float32 matmul.\n"
        "* `engine-B`: the float32 model's decoder linears quantized with `make_quantizer('rtn', bits=B, "
        "group_size=64)` (`engine.model.quantize_model`), `engine.train.add_lora`, compute dtype bfloat16 "
        "and the embeddings, norms and lm_head cast to bfloat16 (`-fp32`: all float32). `-host` / `-disk`: "
        "the packed blocks in a host or disk `BlockStore` streamed by `BlockStreamer` (prefetch "
        f"{args.prefetch}); the disk store reads each block file with the page cache dropped. On the disk "
        "tier the input embeddings and the output head are on disk too, read a row per distinct token and a "
        "tile of vocabulary rows at a time (`offload_vocab_tables`, as `modulora finetune --offload disk`). The engine's "
        "loss is the trainer's, `engine.train.losses.chunked_causal_lm_loss` (the output head and "
        "cross-entropy a tile of the vocabulary at a time, as many logits as 64 positions over the whole "
        "vocabulary, the gradient gathered in the same pass: the same value and gradients as the model's own "
        "loss); `-hfloss` uses "
        "`model(..., labels=...).loss` like PEFT, and `peft-bf16-chunked` gives PEFT the chunked loss, to "
        "show what each part contributes.",
    ]
    for size, rows in results.items():
        shape = SIZES[size]
        parts.append(f"## {size}: {shape.describe()} ({shape.params / 1e6:.0f} M parameters, "
                     f"{next(iter(rows.values()))['lora_params_m']:.2f} M trainable)\n\n" + results_table(rows))
        target_text, _ = targets_table(rows)
        if target_text.count("\n") > 1:
            parts.append(f"Targets at {size}:\n\n" + target_text)
        noisy = [f"`{s}`" for s, r in rows.items() if r["others_cpu"] + r["steal_cpu"] > 0.2]
        waited = sum(r["waited_s"] for r in rows.values())
        parts.append("Noise: CPU the rest of the machine used while the fastest repeat's steps ran (other "
                     "processes plus hypervisor steal, in cores; 0 is a quiet machine): "
                     + ", ".join(f"`{s}` {r['others_cpu'] + r['steal_cpu']:.2f}" for s, r in rows.items())
                     + ". Tokens/s of every repeat: "
                     + "; ".join(f"`{s}` " + " / ".join(f"{t:.0f}" for t in r["tokens_per_s_runs"])
                                 for s, r in rows.items())
                     + (f". Shared cores during: {', '.join(noisy)}." if noisy else ".")
                     + (f" (Before the fastest repeats the bench waited {waited:.0f} s in all for other work to "
                        "calm down.)" if waited >= 1 else ""))
    parts.append("![peak memory and throughput](benchmarks.png)")
    if allocator:
        size = list(results)[-1]
        env = " ".join(f"{k}={v}" for k, v in NO_RETENTION.items())
        rows = []
        for system, r in allocator.items():
            default = results[size].get(system)
            rows.append([f"`{system}`", f"{default['peak_mib']:.0f}" if default else "-", f"{r['peak_mib']:.0f}",
                         f"{r['tensor_peak_mib']:.0f}", f"{default['tokens_per_s']:.0f}" if default else "-",
                         f"{r['tokens_per_s']:.0f}"])
        ratio = allocator["engine-3-disk"]["peak_mib"] / allocator["peft-bf16"]["peak_mib"]
        parts.append(f"### How much of the peak is the allocator ({size})\n\n"
                     f"The same two systems once more with `{env}`: glibc then serves every allocation over "
                     "128 KiB with its own mapping and unmaps it on free, and trims the heap on every free, so "
                     "RSS follows the live tensors (plus what the libraries hold), at the cost of a page fault "
                     "for every page of every new buffer.\n\n"
                     + table(["system", "peak MiB (default glibc)", "peak MiB", "live tensors MiB",
                              "tokens/s (default glibc)", "tokens/s"], rows)
                     + f"\n\nDisk tier against bf16 LoRA with this setting on both: {ratio:.2f}x.")
    if profiles:
        parts.append(f"### Where the time goes ({list(results)[-1]})\n\n"
                     "torch.profiler over the measured steps of one more run of each system (the profiler's "
                     "overhead included): operators by self time on the calling thread (an operator's intra-op "
                     "threads run inside that time):\n\n" + "\n\n".join(
                         f"`{system}`: {prof['total_ms_per_step']:.0f} ms per step in operators\n\n"
                         + table(["operator", "ms/step", "share", "calls/step"],
                                 [[f"`{op['name'][:60]}`", f"{op['self_ms_per_step']:.0f}", f"{100 * op['share']:.1f}%",
                                   f"{op['calls_per_step']:.0f}"] for op in prof["ops"]])
                         for system, prof in profiles.items()))
    if "dequant" in sections:
        parts.append("## Dequantization throughput\n\n`bench/dequant.py`'s measurement (its `measure()`), run "
                     "here: group-wise RTN weights dequantized whole, against a float32 memory copy.\n\n"
                     + sections["dequant"])
    if "optimizers" in sections:
        rows = [[r["shape"], f"{r['params_m']:.2f}", r["tensors"], r["optimizer"], f"{r['ms']:.2f}",
                 f"{r['ms_best']:.2f}"] for r in sections["optimizers"]]
        parts.append("## Optimizer step on LoRA-sized parameter sets\n\n"
                     f"Rank-{args.rank} adapters of every decoder linear of the shape (float32 parameters with "
                     f"fixed gradients), {args.threads} threads; median and best of {args.optimizer_steps} steps "
                     "after 2 warm-up steps.\n\n"
                     + table(["shape", "M params", "tensors", "optimizer", "ms/step (median)", "best"], rows))
    if "qdylora" in sections:
        parts.append("## QDyLoRA: one dynamic run against fixed-rank runs\n\n" + sections["qdylora"])
    return "\n\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="39m,134m", help=f"Comma-separated, from {', '.join(SIZES)}.")
    parser.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS))
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4, help="Measured training steps per system.")
    parser.add_argument("--warmup", type=int, default=1, help="Unmeasured steps first (Adam's moments allocated).")
    parser.add_argument("--prefetch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size-systems", action="append", default=[], metavar="SIZE=SYSTEMS",
                        help="Another system list for one size (repeatable), e.g. 368m=peft-bf16,engine-3.")
    parser.add_argument("--repeats", type=int, default=2, help="Runs of every system (interleaved).")
    parser.add_argument("--wait-quiet", type=float, default=120.0,
                        help="Before each child, wait up to this many seconds until other processes use under "
                             "0.3 cores (0: do not wait).")
    parser.add_argument("--profile-systems", default="", help="Also profile these systems at the last size.")
    parser.add_argument("--skip-sections", action="store_true", help="Only the training comparison.")
    parser.add_argument("--allocator-check", action="store_true",
                        help="Also run peft-bf16 and engine-3-disk at the last size with glibc returning memory at once.")
    parser.add_argument("--dequant-dim", type=int, default=4096)
    parser.add_argument("--optimizer-shapes", default="134m,7b", help=f"From {', '.join(SIZES)}, 7b.")
    parser.add_argument("--optimizer-steps", type=int, default=20)
    parser.add_argument("--qdylora-ranks", default="1,2,4,8,16")
    parser.add_argument("--qdylora-steps", type=int, default=40)
    parser.add_argument("--work", type=Path, default=None, help="Scratch directory (default: a temporary one).")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--size", default="134m", help="The child's size.")
    parser.add_argument("--profile", action="store_true", help="Child: torch.profiler over the measured steps.")
    parser.add_argument("--profile-rows", type=int, default=15)
    parser.add_argument("--profile-out", default=None)
    parser.add_argument("--tensor-peak", action="store_true", help="Child: also live tensors at the peak of one more step.")
    args = parser.parse_args()
    if args.child:
        with work_dir(args.work, "compare-child") as work:
            args.work = work
            print(json.dumps(child(args)))
        return
    parent(args)


if __name__ == "__main__":
    main()
