"""Real scale on this machine: a Llama-2-7B-shaped checkpoint and a Llama-65B-shaped 3-bit directory through the
commands users type, each under ``/usr/bin/time -v``: peak RSS of the whole process, wall time, disk used.

* The 7B checkpoint: random bfloat16 weights (std 0.02, norms 1) in the Hugging Face layout (sharded safetensors
  with their index, ``config.json``, the shared model's tokenizer), written tensor by tensor: 13.5 GB.
* The 65B directory: a 130 GB float source does not fit this disk, so the quantized directory is written directly,
  one decoder block of random 3-bit codes at a time, in the product's own format (``QuantizedWriter``), and is
  then read by the same loader users' directories are.

    python bench/scale.py --work /data/scale [--rows quantize-rtn,eval-disk,...] [--redo]

Each row's peak is also predicted by ``modulora plan --stage`` for the same settings.  Every finished row's
measurement is kept in ``docs/scale.jsonl`` (rows already there are skipped unless ``--redo``), and the table of
them all is written to ``docs/scale.md``: a row takes up to hours, so the figures outlive the scratch folder.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from _common import DOCS, REPO, SHARED, TRAIN_TXT, VALID_TXT, table, write_doc
from engine.storage import atomic_write_bytes

GIB = 1 << 30
SHARD_BLOCKS = 4  # decoder blocks per checkpoint shard (about 1.6 GB at 7B)
RESULTS = DOCS / "scale.jsonl"  # one finished row per line, the latest measurement of each row
ROWS: dict[str, dict[str, Any]] = {}  # filled by ``row``


def row(name: str, limit_gib: float, inputs: str = "ckpt7b", env: dict[str, str] | None = None) -> Any:
    """A row: its command, planner arguments and outputs (``build``), its memory limit, the input it needs
    (``ckpt7b``, ``ckpt7b-2``, ``q7b2-rtn`` or ``q65b``), and environment variables of its command."""
    def register(build: Any) -> Any:
        ROWS[name] = {"build": build, "limit_gib": limit_gib, "inputs": inputs, "env": env or {}}
        return build

    return register


# --------------------------------------------------------------------------------------------------
# The inputs


def write_checkpoint(path: Path, model: str, n_blocks: int | None = None, seed: int = 0) -> None:
    """A random bfloat16 checkpoint of a built-in shape (``n_blocks`` decoder blocks, else the model's), shard by
    shard, never more than one shard's tensors in memory."""
    from safetensors.torch import save_file

    from engine.model import blocks_prefix, meta_model, open_source
    from engine.offload.shapes import load_config

    blocks = {"num_hidden_layers": n_blocks} if n_blocks else {}
    config = load_config(model, torch_dtype="bfloat16", tie_word_embeddings=False, **blocks)
    staging = path.with_name(path.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    meta = meta_model(config)
    prefix = blocks_prefix(meta)
    names = [(name, tuple(p.shape)) for name, p in meta.named_parameters()]
    groups: dict[str, list[tuple[str, tuple[int, ...]]]] = {}
    for name, shape in names:
        index = int(name[len(prefix) + 1:].split(".")[0]) // SHARD_BLOCKS if name.startswith(f"{prefix}.") else -1
        groups.setdefault(str(index), []).append((name, shape))
    n_shards = len(groups)
    weight_map, generator = {}, torch.Generator().manual_seed(seed)
    for number, (key, members) in enumerate(sorted(groups.items(), key=lambda kv: int(kv[0]))):
        shard = f"model-{number + 1:05d}-of-{n_shards:05d}.safetensors"
        tensors = {}
        for name, shape in members:
            value = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=generator) * 0.02
            tensors[name] = value.to(torch.bfloat16)
        save_file(tensors, staging / shard, metadata={"format": "pt"})
        weight_map.update({name: shard for name in tensors})
        del tensors
        print(f"  {shard}: {len(members)} tensors", file=sys.stderr, flush=True)
    (staging / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config.save_pretrained(staging)
    open_source(SHARED / "models" / "stories260K.gguf").tokenizer().save_pretrained(staging)
    staging.rename(path)


def write_random_directory(path: Path, model: Any, bits: int, group_size: int, seed: int = 0,
                           device: str = "cpu") -> None:
    """A quantized directory of a built-in shape (or a config) with random packed codes, written one block at a
    time; the codes are drawn on ``device`` (a GPU draws a 65B model's in seconds)."""
    from synthetic import packed_placeholder, random_block

    from engine.lora import ModuLoRALinear
    from engine.model import QuantizedWriter, blocks_prefix, decoder_blocks, meta_model, open_source, replace_module
    from engine.offload.shapes import load_config
    from engine.quant import GroupQuantizedWeight

    config = load_config(model, torch_dtype="bfloat16", tie_word_embeddings=False) if isinstance(model, str) else model
    meta = meta_model(config)
    tokenizer = open_source(SHARED / "models" / "stories260K.gguf").tokenizer()
    writer = QuantizedWriter(path, config, tokenizer)
    generator = torch.Generator(device).manual_seed(seed)
    for index, block in enumerate(decoder_blocks(meta)):
        for name, linear in list(block.named_modules()):
            if isinstance(linear, torch.nn.Linear):
                placeholder = packed_placeholder(linear.out_features, linear.in_features, bits, group_size)
                tensors = {k: v.cpu() for k, v in random_block(dict(placeholder._buffers), bits, generator).items()}
                qweight = GroupQuantizedWeight.from_state(tensors, placeholder.config())
                replace_module(block, name, ModuLoRALinear(qweight))
        for name, param in list(block.named_parameters()):
            owner, _, key = name.rpartition(".")
            block.get_submodule(owner)._parameters[key] = torch.nn.Parameter(torch.ones(param.shape, dtype=torch.bfloat16),
                                                                            requires_grad=False)
        writer.write_block(meta, index)
        block.to("meta")
        print(f"  block {index}", file=sys.stderr, flush=True)
    for name, param in list(meta.named_parameters()):
        if param.is_meta and not name.startswith(f"{blocks_prefix(meta)}."):
            owner, _, key = name.rpartition(".")
            value = (torch.ones(param.shape) if param.dim() == 1
                     else torch.randn(param.shape, generator=generator, device=device).cpu() * 0.02)
            meta.get_submodule(owner)._parameters[key] = torch.nn.Parameter(value.to(torch.bfloat16), requires_grad=False)
    name = model if isinstance(model, str) else config.model_type
    writer.finish(meta, {"source_model": f"random {name}", "quantizer": {"method": "rtn", "bits": bits,
                                                                        "group_size": group_size}})


# --------------------------------------------------------------------------------------------------
# Running a command


class ProcessTreePeak:
    """Samples the RSS of every process below ``pid`` (Ray's workers included) and keeps each one's peak."""

    def __init__(self, pid: int) -> None:
        import psutil

        self.root = psutil.Process(pid)
        self.peaks: dict[int, tuple[str, int]] = {}
        self.max_load = 0.0  # the machine's 1-minute load average: above 2, the command shared the 2 cores
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import psutil

        while not self.stop.is_set():
            try:
                processes = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                break
            for process in processes:
                try:
                    rss, name = process.memory_info().rss, " ".join(process.cmdline()[:3])
                except psutil.Error:
                    continue
                if rss > self.peaks.get(process.pid, ("", 0))[1]:
                    self.peaks[process.pid] = (name, rss)
            self.max_load = max(self.max_load, os.getloadavg()[0])
            time.sleep(0.2)

    def finish(self) -> dict[int, tuple[str, int]]:
        self.stop.set()
        self.thread.join()
        return self.peaks


def timed(args: list[str], work: Path, log: Path, extra_env: dict[str, str]) -> dict[str, Any]:
    """``/usr/bin/time -v modulora ARGS``: exit code, peak RSS, wall seconds, and each worker process's peak."""
    env = {**os.environ, "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", **extra_env}
    command = ["/usr/bin/time", "-v", sys.executable, "-m", "engine.cli", *map(str, args)]
    shown = "".join(f"{k}={v} " for k, v in extra_env.items()) + "modulora " + " ".join(map(str, args)).replace(str(work), "$WORK").replace(str(SHARED), "$SHARED")
    print(f"$ {shown}", file=sys.stderr, flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    with open(log, "w") as out:  # the commit is the tree the command starts from, whatever is committed meanwhile
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        tree = ProcessTreePeak(process.pid)
        process.wait()
        peaks = tree.finish()
    text = log.read_text()
    if process.returncode != 0:
        raise SystemExit(f"{shown} failed; see {log}:\n{text[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text).group(1)
    seconds = sum(float(part) * 60**i for i, part in enumerate(reversed(wall.split(":"))))
    workers = [rss for pid, (name, rss) in peaks.items() if "ray::" in name or "default_worker" in name]
    return {"command": shown, "peak_rss_gib": rss_kb * 1024 / GIB, "wall_s": seconds,
            "worker_peaks_gib": sorted((w / GIB for w in workers), reverse=True), "max_load": tree.max_load,
            "commit": commit.stdout.strip()}


def same_directories(a: Path, b: Path) -> bool:
    """Every safetensors file of two quantized directories holds the same tensors, bit for bit."""
    from safetensors import safe_open

    files = sorted(p.relative_to(a) for p in a.rglob("*.safetensors"))
    if files != sorted(p.relative_to(b) for p in b.rglob("*.safetensors")):
        return False
    for file in files:
        with safe_open(a / file, "pt") as fa, safe_open(b / file, "pt") as fb:
            if set(fa.keys()) != set(fb.keys()):
                return False
            if any(not torch.equal(fa.get_tensor(k), fb.get_tensor(k)) for k in fa.keys()):
                return False
    return True


def disk_gb(*paths: Path) -> float:
    return sum(p.stat().st_size for path in paths if path.exists() for p in path.rglob("*") if p.is_file()) / 1e9


# --------------------------------------------------------------------------------------------------
# The rows

CALIB = ["--calib", TRAIN_TXT, "--calib-windows", 32, "--calib-seq-len", 512]
PLAN_CALIB = ["--calib-windows", 32, "--calib-seq-len", 512]
PLAN_7B = ["--model", "llama-7b", "--device", "cpu", "--host-mem", "24GiB", "--source-dtype", "bfloat16"]
OPTQ = ["--method", "optq", "--bits", 3, "--group-size", 64, "--act-order"]
PLAN_OPTQ = ["--method", "optq", "--bits", 3, "--group-size", 64]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # the one-process reference of the Ray row runs the workers' kernels


@row("quantize-rtn", 3.0)
def quantize_rtn(w: Path) -> tuple[list, list, list]:
    return (["quantize", w / "ckpt7b", "--method", "rtn", "--bits", 3, "--out", w / "q7b-rtn"],
            [*PLAN_7B, "--stage", "quantize", "--method", "rtn", "--bits", 3, "--group-size", 32], [w / "q7b-rtn"])


@row("quantize-optq", 4.0)
def quantize_optq(w: Path) -> tuple[list, list, list]:
    return (["quantize", w / "ckpt7b", *OPTQ, *CALIB, "--out", w / "q7b-optq"],
            [*PLAN_7B, "--stage", "quantize", *PLAN_OPTQ, *PLAN_CALIB], [w / "q7b-optq"])


@row("quantize-optq-2-blocks", 4.0, inputs="ckpt7b-2", env=ONE_THREAD)
def quantize_optq_2(w: Path) -> tuple[list, list, list]:
    return (["quantize", w / "ckpt7b-2", *OPTQ, *CALIB, "--out", w / "q7b2-optq"],
            [*PLAN_7B, "--stage", "quantize", *PLAN_OPTQ, *PLAN_CALIB], [w / "q7b2-optq"])


# The Ray row splits the 32 windows into two 16-window shards, one per worker (with 32-window shards one worker
# would hold them all); its one-process reference sums the same two shards, so the weights can be bit for bit alike.
SHARDS_16 = ["--shard-windows", 16]


@row("calibrate-2-workers", 4.0, inputs="ckpt7b-2")
def calibrate(w: Path) -> tuple[list, list, list]:
    return (["calibrate", w / "ckpt7b-2", "--workers", 2, "--threads", 1, *OPTQ, *CALIB, *SHARDS_16,
             "--out", w / "q7b2-optq-ray"],
            [*PLAN_7B, "--stage", "calibrate", *PLAN_OPTQ, *PLAN_CALIB, "--calib-shard-windows", 16, "--workers", 2],
            [w / "q7b2-optq-ray"])


@row("quantize-optq-2-blocks-16-window-shards", 4.0, inputs="ckpt7b-2", env=ONE_THREAD)
def quantize_optq_2_shards(w: Path) -> tuple[list, list, list]:
    return (["quantize", w / "ckpt7b-2", *OPTQ, *CALIB, *SHARDS_16, "--out", w / "q7b2-optq-16"],
            [*PLAN_7B, "--stage", "quantize", *PLAN_OPTQ, *PLAN_CALIB, "--calib-shard-windows", 16],
            [w / "q7b2-optq-16"])


@row("quantize-quip-2-blocks", 4.0, inputs="ckpt7b-2")
def quantize_quip(w: Path) -> tuple[list, list, list]:
    # One refining pass instead of the default 10 (2 LDLQ passes over each layer, not 11): the same tensors live at
    # once, so the same peak; the wall time reported is for this setting.
    return (["quantize", w / "ckpt7b-2", "--method", "quip", "--bits", 2, "--tune-iters", 1, *CALIB,
             "--out", w / "q7b2-quip"],
            [*PLAN_7B, "--stage", "quantize", "--method", "quip", "--bits", 2, *PLAN_CALIB], [w / "q7b2-quip"])


@row("eval-disk", 2.5)
def eval_disk(w: Path) -> tuple[list, list, list]:
    return (["eval", w / "q7b-rtn", "--data", VALID_TXT, "--seq-len", 512, "--limit", 2, "--batch-size", 2,
             "--offload", "disk"],
            [*PLAN_7B, "--stage", "eval", "--bits", 3, "--group-size", 32, "--seq-len", 512, "--batch", 2,
             "--tier", "disk"], [])


@row("correct", 4.0)
def correct(w: Path) -> tuple[list, list, list]:
    return (["correct", w / "q7b-rtn", "--teacher", w / "ckpt7b", "--calib", TRAIN_TXT, "--seq-len", 512, "--limit", 8,
             "--steps", 2, "--batch-size", 4, "--offload", "disk", "--grad-checkpointing", "--out", w / "q7b-corrected"],
            [*PLAN_7B, "--stage", "correct", "--bits", 3, "--group-size", 32, "--seq-len", 512, "--batch", 4,
             "--tier", "disk"], [w / "q7b-corrected"])


@row("correct-2-blocks", 4.0, inputs="q7b2-rtn")
def correct_2(w: Path) -> tuple[list, list, list]:
    # The 2-block shapes (teacher ckpt7b-2, student its RTN 3-bit directory): the initialisation (LoftQ, one SVD
    # per layer) takes about 4 min per 7B-shaped block here, so 32 blocks would take over 2 h for the same peak.
    return (["correct", w / "q7b2-rtn", "--teacher", w / "ckpt7b-2", "--calib", TRAIN_TXT, "--seq-len", 512,
             "--limit", 8, "--steps", 2, "--batch-size", 4, "--offload", "disk", "--grad-checkpointing",
             "--out", w / "q7b2-corrected"],
            [*PLAN_7B, "--stage", "correct", "--bits", 3, "--group-size", 32, "--seq-len", 512, "--batch", 4,
             "--tier", "disk"], [w / "q7b2-corrected"])


@row("finetune-disk", 2.5)
def finetune_disk(w: Path) -> tuple[list, list, list]:
    return (["finetune", w / "q7b-rtn", "--data", TRAIN_TXT, "--seq-len", 512, "--limit", 4, "--batch-size", 1,
             "--steps", 2, "--rank", 16, "--offload", "disk", "--optimizer", "cpu_adam", "--offload-optimizer",
             "--grad-checkpointing", "--dtype", "bfloat16", "--save-every", 0, "--out", w / "run7b"],
            [*PLAN_7B, "--stage", "finetune", "--bits", 3, "--group-size", 32, "--seq-len", 512, "--batch", 1,
             "--rank", 16, "--tier", "disk", "--optimizer-offload", "yes", "--compute-dtype", "bfloat16"],
            [w / "run7b"])


@row("export-merged", 3.0)
def export_merged(w: Path) -> tuple[list, list, list]:
    return (["export", w / "run7b", "--merged", "--dtype", "bfloat16", "--out", w / "export7b"],
            [*PLAN_7B, "--stage", "export", "--bits", 3, "--group-size", 32, "--rank", 16, "--compute-dtype",
             "bfloat16"], [w / "export7b"])


@row("finetune-65b-disk", 6.0, inputs="q65b")
def finetune_65b(w: Path) -> tuple[list, list, list]:
    return (["finetune", w / "q65b", "--data", TRAIN_TXT, "--seq-len", 256, "--limit", 1, "--batch-size", 1,
             "--steps", 1, "--rank", 16, "--offload", "disk", "--optimizer", "cpu_adam", "--offload-optimizer",
             "--grad-checkpointing", "--dtype", "bfloat16", "--save-every", 0, "--out", w / "run65b"],
            ["--model", "llama-65b", "--device", "cpu", "--host-mem", "24GiB", "--stage", "finetune", "--bits", 3,
             "--group-size", 64, "--seq-len", 256, "--batch", 1, "--rank", 16, "--tier", "disk",
             "--optimizer-offload", "yes", "--compute-dtype", "bfloat16"], [w / "run65b"])


def write_rtn_directory(work: Path, checkpoint: str, path: Path) -> None:
    """``modulora quantize CHECKPOINT --method rtn --bits 3`` (as the quantize-rtn row), writing it first if needed."""
    if not (work / checkpoint).is_dir():
        write_checkpoint(work / checkpoint, "llama-7b", n_blocks=2)
    subprocess.run([sys.executable, "-m", "engine.cli", "quantize", str(work / checkpoint), "--method", "rtn",
                    "--bits", "3", "--out", str(path)], cwd=REPO, check=True)


def make_inputs(work: Path, wanted: list[str]) -> None:
    """Write the inputs the wanted rows need and do not have yet."""
    makers = {
        "ckpt7b": lambda path: write_checkpoint(path, "llama-7b"),
        "ckpt7b-2": lambda path: write_checkpoint(path, "llama-7b", n_blocks=2),
        "q65b": lambda path: write_random_directory(path, "llama-65b", bits=3, group_size=64),
        "q7b2-rtn": lambda path: write_rtn_directory(work, "ckpt7b-2", path),
    }
    for name in dict.fromkeys(ROWS[r]["inputs"] for r in wanted):
        if not (work / name).is_dir():
            print(f"writing {name}", file=sys.stderr)
            start = time.perf_counter()
            makers[name](work / name)
            print(f"  {disk_gb(work / name):.1f} GB in {time.perf_counter() - start:.0f} s", file=sys.stderr)


def recorded() -> dict[str, Any]:
    """The rows ``docs/scale.jsonl`` holds now, by name."""
    lines = RESULTS.read_text().splitlines() if RESULTS.is_file() else []
    return {record["row"]: record for record in map(json.loads, lines)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="Scratch folder (about 70 GB at the most).")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"Rows to run: {', '.join(ROWS)}.")
    parser.add_argument("--redo", action="store_true", help="Measure the rows again even if docs/scale.jsonl has them.")
    args = parser.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    done = recorded()
    wanted = [r for r in args.rows.split(",") if r]
    unknown = [r for r in wanted if r not in ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; rows: {', '.join(ROWS)}")
    todo = [r for r in wanted if args.redo or r not in done]
    reference = "quantize-optq-2-blocks-16-window-shards"
    if "calibrate-2-workers" in todo and reference not in todo and not (work / "q7b2-optq-16").is_dir():
        print(f"calibrate-2-workers is compared with {reference}'s output, not in {work}: its weights are checked "
              f"once that row runs (--rows {reference})", file=sys.stderr)
    make_inputs(work, todo)
    for name in todo:
        spec = ROWS[name]
        command, _, outputs = spec["build"](work)
        for output in outputs:
            shutil.rmtree(output, ignore_errors=True)
        result = {"row": name, "limit_gib": spec["limit_gib"], "inputs": spec["inputs"],
                  **timed(command, work, work / f"{name}.log", spec["env"]), "disk_gb": disk_gb(*outputs)}
        if name == "finetune-disk":
            files = [p for p in (work / "run7b").rglob("*") if p.is_file() and "checkpoints" not in p.parts]
            model_bytes = disk_gb(work / "q7b-rtn") * 1e9
            result["run_dir_share_of_model"] = sum(p.stat().st_size for p in files) / model_bytes
            result["run_dir_share_without_adapter"] = sum(
                p.stat().st_size for p in files if "adapter" not in p.parts) / model_bytes
        done = {**recorded(), name: result}  # rows another run of this script recorded meanwhile are kept
        if {"calibrate-2-workers", reference} <= done.keys() and (work / "q7b2-optq-16").is_dir():
            done["calibrate-2-workers"]["bit_identical_to_one_process"] = same_directories(
                work / "q7b2-optq-16", work / "q7b2-optq-ray")
        atomic_write_bytes(RESULTS, "".join(json.dumps(r) + "\n" for r in done.values()).encode())  # hours of rows
        print(json.dumps(result), file=sys.stderr, flush=True)
    report(done, work)


def report(done: dict[str, Any], work: Path) -> None:
    """The table of every finished row, each with the planner's prediction as the planner is now."""
    rows, notes, commands = [], [], []
    for name in [n for n in ROWS if n in done]:
        r = done[name]
        plan = planned(ROWS[name]["build"](work)[1])
        peak = r["peak_rss_gib"]
        planned_peak = plan.get("host_peak_bytes", 0) / GIB if plan else None
        workers = r.get("worker_peaks_gib", [])
        cells = [f"{w:.2f}" for w in workers[:2]]
        if plan and "worker_peak_bytes" in plan:
            cells.append(f"planned {plan['worker_peak_bytes'] / GIB:.2f}")
        limit = ROWS[name]["limit_gib"]  # the issue's, as the rows declare it now
        rows.append([name, ROWS[name]["inputs"], f"{peak:.2f}", f"{limit:.1f}",
                     "yes" if peak <= limit else "**no**", ", ".join(cells) or "-",
                     f"{planned_peak:.2f}" if planned_peak else "-",
                     f"{planned_peak / peak:.2f}" if planned_peak else "-", f"{r['wall_s']:.0f}",
                     f"{r['max_load']:.1f}" if "max_load" in r else "n/r", f"{r['disk_gb']:.1f}"])
        commands.append(r["command"])
        if "run_dir_share_of_model" in r:
            rest = r.get("run_dir_share_without_adapter")
            notes.append(f"- `{name}`: the run directory without checkpoints is {100 * r['run_dir_share_of_model']:.2f}% "
                         "of the quantized model's size: the trained adapter (rank 16 on every linear layer, float32)"
                         + (f" and {100 * rest:.5f}% logs" if rest is not None else " and the logs")
                         + "; no block is copied (the disk tier reads the quantized directory in place).")
        if "bit_identical_to_one_process" in r:
            same = "bit for bit the same" if r["bit_identical_to_one_process"] else "**not** the same"
            notes.append(f"- `{name}`: the packed weights of the Ray run and of the one process that sums the same "
                         "two 16-window shards (`quantize-optq-2-blocks-16-window-shards`, one thread like each "
                         f"worker) are {same}.  Each worker holds one shard.  The statistics never leave the "
                         "workers whole: each worker sums its own shards, the sum goes from worker to worker in "
                         "shard order, and the worker a layer falls to aligns and quantizes it; the driver receives "
                         "packed layers only and sends each worker those it lacks.  Sums and packed layers travel "
                         "in pieces that ride inside Ray's messages: the object store would keep their pages mapped "
                         "in each worker's RSS.")
            for reference in ("quantize-optq-2-blocks", "quantize-optq-2-blocks-16-window-shards"):
                if reference in done and workers:
                    within = "within" if max(workers) <= done[reference]["peak_rss_gib"] else "**over**"
                    notes.append(f"- `{name}`: its largest worker, {max(workers):.2f} GiB, is {within} the one "
                                 f"process's peak in `{reference}`, {done[reference]['peak_rss_gib']:.2f} GiB.")
        if name == "quantize-optq-2-blocks-16-window-shards":
            over = ("over the limit the issue sets for the default command (one 32-window shard, "
                    "`quantize-optq-2-blocks`)" if peak > limit else "above the one-shard row")
            notes.append(f"- `{name}`: {over}: with two shards one process holds the sums and "
                         "the next shard's statistics of the largest group (down_proj's X^T X and, with GPTAQ, its "
                         "cross sums: 4 x 485 MB) at once, as the shard-order fold that Ray reproduces bit for bit "
                         "needs.  Each Ray worker holds one shard, so it does not.")
        if name == "finetune-65b-disk" and plan:
            parts = {part["name"].split(" (")[0]: part["nbytes"] / GIB for part in plan["parts"]}
            backward = sum(v for k, v in parts.items() if k in ("buffers: streamed blocks in flight",
                                                                  "activations: block checkpoints")
                           or k.startswith("activations: peak of"))  # the step's largest activation phase
            notes.append(f"- `{name}`: planned {planned_peak - peak:.2f} GiB above the measurement.  The row takes "
                         "one step (the issue's setting).  Adam's moments are made at that step, after the "
                         "backward has released its streamed blocks.  So in this run they never meet the backward's "
                         "peak.  From the second step on they would, and the planner gives that later peak: the "
                         f"moments ({parts['optimizer: Adam moments']:.2f} GiB) together with the backward's blocks "
                         f"in flight, block checkpoints and the step's largest activation phase ({backward:.2f} "
                         "GiB).  The gap matches the backward's part, as this explanation predicts.  A two-step run "
                         "was not "
                         "measured.")
        if ROWS[name]["inputs"] in ("ckpt7b-2", "q7b2-rtn"):
            shared = (f" (the row shared the 2 cores, max load {r['max_load']:.1f}: alone it takes less)"
                      if r.get("max_load", 0) > 2.5 else "")
            notes.append(f"- `{name}`: {r['wall_s'] / 2:.0f} s per 7B-shaped block (2 blocks); 32 blocks would "
                         f"take about {16 * r['wall_s'] / 3600:.1f} h{shared}.")
    headers = ["row", "input", "peak RSS GiB", "limit GiB", "within", "Ray workers' peaks GiB", "planned GiB",
               "planned / measured", "wall s", "max load", "output GB"]
    earlier = [name for name in ROWS if done.get(name, {}).get("from_doc")]
    if earlier:
        notes.append(f"- Measured by an earlier version of this script, whose records did not outlive its scratch "
                     f"folder (figures rebuilt from this page's rounded table): {', '.join(f'`{m}`' for m in earlier)}.")
    commands = {name: ROWS[name]["build"](work)[0] for name in ROWS}
    calibrated = [name for name in ROWS if name in done and commands[name][0] in ("quantize", "calibrate")
                  and "--calib" in commands[name]]
    for fix, held, method in CALIBRATION_FIXES:
        before = [name for name in calibrated if predates(done[name], fix)
                  and (method is None or commands[name][commands[name].index("--method") + 1] == method)]
        if before:
            notes.append(f"- Measured before {fix}, while {held}; the plan, made now, does not count that (the "
                         f"command may need less now): {', '.join(f'`{m}`' for m in before)}.")
    notes.append(f"- The plans are made when this page is written, for its machine's CPU, which {half_matmul_words()}; "
                 "a row measured on a CPU of the other kind is compared with a plan for this one.")
    missing = [name for name in ROWS if name not in done]
    if missing:
        notes.append(f"- Not measured yet (no finished run recorded): {', '.join(f'`{m}`' for m in missing)}.")
    body = "\n".join([INTRO, "", table(headers, rows), "", *notes])
    write_doc("scale", "Real scale: a 7B-shaped checkpoint and a 65B-shaped directory", "scale.py", body, commands)


CALIBRATION_FIXES = [  # (commit, what calibration held before it, the method it concerns or None), oldest first
    ("49c7bf5", "calibration held the input embeddings beside the blocks (250 MiB at 7B)", None),
    ("f6bb200", "every float layer calibration dropped (quantized away; each block's float twin) waited for Python's "
                "cyclic garbage collector", None),
    ("d7be40d", "OPTQ kept each layer's statistics beside the two Hessian-sized matrices it made from them (485 MB "
                "for a 7B down_proj)", "optq"),
    ("dcf0887", "QuIP# kept each layer's statistics beside its rotated Hessian (485 MB for a 7B down_proj)", "quip"),
]


def half_matmul_words() -> str:
    """Whether this CPU multiplies bfloat16 matrices natively, as the planner's activation sizes depend on it."""
    from engine.lora.function import matmul_dtype

    if matmul_dtype(torch.bfloat16, torch.device("cpu")) == torch.bfloat16:
        return "multiplies bfloat16 matrices natively"
    return ("has no bfloat16 matrix kernels: the engine multiplies such layers in float32 there, and the plans "
            "count those float32 operands (a plan for a CPU with the kernels is lower)")


def predates(record: dict[str, Any], fix: str) -> bool:
    """Whether ``record`` was measured on a tree without commit ``fix`` (records without a commit are older)."""
    measured = record.get("commit")
    return measured is None or subprocess.run(["git", "merge-base", "--is-ancestor", fix, measured], cwd=REPO,
                                              capture_output=True).returncode != 0


def planned(args: list[Any]) -> dict[str, Any] | None:
    """The planner's JSON for a row (``modulora plan ... --json``)."""
    done = subprocess.run([sys.executable, "-m", "engine.cli", "plan", *map(str, args), "--json"], cwd=REPO,
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        print(f"plan {' '.join(args)} failed: {done.stderr.strip()}", file=sys.stderr)
        return None
    return json.loads(done.stdout)


INTRO = """Each command as users type it, under `/usr/bin/time -v` (peak RSS of the whole process; the Ray row's
workers sampled every 0.2 s), on this 2-core, 24 GiB machine with no GPU.  Inputs: `ckpt7b`, a Llama-7B-shaped
checkpoint of random bfloat16 weights in the Hugging Face layout (9 safetensors shards, index, config, the shared
model's tokenizer; 13.5 GB); `ckpt7b-2`, the same shapes with 2 decoder blocks, for the rows whose 32 blocks would
take hours (every block has the same shapes, so the peak is the same); `q65b`, a Llama-65B-shaped 3-bit (group
64) directory of random codes written block by block by the product's `QuantizedWriter` and read by the same
loader as any user's directory.  "planned" is `modulora plan --stage ...` for the same settings (its JSON's
`host_peak_bytes`).  "max load" is the machine's highest 1-minute load average during the row (n/r: not
recorded): above 2 the row shared the 2 cores with another and its wall time is longer than alone."""


if __name__ == "__main__":
    main()
