"""The memory and time planner (``engine.offload.planner``) against real models, real training steps and papers.

Run as a script, this file is also the measuring child process of the peak-memory
tests: ``python tests/test_plan.py '<json spec>'`` builds the model, runs a training
step and prints its peak RSS over the post-import baseline as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.utils import logging as hf_logging

from engine.cli import main as modulora_main
from engine.lora.linear import ModuLoRALinear
from engine.model import add_lora, lora_parameters, quantize_model
from engine.offload import BlockStreamer, make_store, offload_vocab_tables
from engine.offload.planner import GIB, MIB, Plan, make_plan
from engine.offload.shapes import ModelShapes, load_config, model_shapes
from engine.options import default_of, parse_size
from engine.pipelines import DataSpec, HardwareSpec, LoraSpec, OffloadSpec, PlanSpec, TrainSpec, plan_inputs
from engine.procstat import PeakRss
from engine.quant import RTNQuantizer, make_quantizer
from engine.train.trainer import make_optimizer

# The child's glibc keeps its mmap threshold at 128 KiB, so every tensor larger than that is its own mapping,
# handed back to the kernel when freed: RSS then follows the live tensors.  By default glibc raises the threshold
# (up to 32 MiB) as tensors are freed and carves later ones from a heap it does not return: the first shape below
# then peaked at 481 MB instead of 375 MB.  MALLOC_ARENA_MAX=1 made no difference; MALLOC_TRIM_THRESHOLD_ works too
# (setting it also freezes the mmap threshold), but the threshold itself is what matters.
MEASURE_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}
TOLERANCE = 0.10


def llama_config(hidden: int, ffn: int, layers: int, heads: int, vocab: int) -> PretrainedConfig:
    return AutoConfig.for_model("llama", hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                                num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                                tie_word_embeddings=False)


def _warm_up_kernels(dtype: torch.dtype, bits: int, group_size: int) -> None:
    """One tiny forward and backward, whole and in tiles: compiles the dequantization kernels (where compiling
    is on), a one-time cost of the process like its imports."""
    for tile in (None, 64 * 256):
        layer = ModuLoRALinear(RTNQuantizer(bits=bits, group_size=group_size).quantize(torch.randn(256, 512)),
                               rank=4, compute_dtype=dtype, tile_numel=tile)
        x = torch.randn(2, 8, 512, dtype=dtype, requires_grad=True)
        layer(x).float().sum().backward()


def measure_step(spec: dict[str, Any]) -> dict[str, Any]:
    """Peak RSS of one training step, over the RSS after imports and kernel warm-up.

    Model: random init, RTN-quantized, LoRA on every decoder linear, float parameters and
    compute in ``spec["dtype"]``, its blocks resident or streamed from a disk store.  The
    step is the trainer's (forward and backward with gradient checkpointing, gradient
    clipping, AdamW) but with the model's own loss, the one the plan models.  One step
    runs before the measured one: the plan is of a step in the steady state, when Adam's
    moments exist (the first step creates them only after its activations are gone) and
    kernels are set up for these shapes (a shorter first step left 10 MB of that setup to
    the measured one).
    """
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(2)
    dtype = getattr(torch, spec["dtype"])
    _warm_up_kernels(dtype, spec["bits"], spec["group_size"])
    rss = PeakRss()

    torch.manual_seed(0)
    config = llama_config(spec["hidden"], spec["ffn"], spec["layers"], spec["heads"], spec["vocab"])
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.config.use_cache = False
    quantize_model(model, RTNQuantizer(bits=spec["bits"], group_size=spec["group_size"]))
    add_lora(model, spec["rank"], 2.0 * spec["rank"], seed=0)
    for layer in model.modules():
        if isinstance(layer, ModuLoRALinear):
            layer.compute_dtype = dtype
    streamer = None
    if spec["tier"] != "device":
        streamer = BlockStreamer(model, make_store(spec["tier"], directory=spec["block_dir"]), spec["prefetch"])
        if spec["tier"] == "disk":  # as modulora finetune --offload disk
            offload_vocab_tables(model, spec["block_dir"])
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = list(lora_parameters(model).values())
    optimizer = make_optimizer("adamw", params, TrainSpec())
    tokens = torch.randint(0, spec["vocab"], (spec["batch"], spec["seq_len"]))

    def step() -> float:
        loss = model(input_ids=tokens, labels=tokens).loss  # the loss the plan models (an upper bound for the trainer's)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    step()
    rss.reset()  # malloc_trim, then "5" into /proc/self/clear_refs: VmHWM := VmRSS
    loss = step()
    peak = rss.peak()
    if streamer is not None:
        streamer.close()
    return {"peak": peak, "loss": loss}


def plan_for(shapes: ModelShapes, **settings: Any) -> Plan:
    """The plan of a run on ``shapes``: 3 bits g64, r16, 512 tokens, 24 GiB GPU, 64 GiB host, unless ``settings`` say."""
    machine = {"device_mem": 24 * GIB, "host_mem": 64 * GIB}
    machine |= {key: settings.pop(key) for key in list(settings) if key in HardwareSpec.__dataclass_fields__}
    run = {"bits": 3, "group_size": 64, "rank": 16, "seq_len": 512, "batch": 1} | settings
    return make_plan(plan_inputs(PlanSpec(model="(shapes given)", hardware=HardwareSpec(**machine), **run), shapes))


def part_bytes(plan: Plan, prefix: str) -> int:
    return sum(part.nbytes for part in plan.parts if part.name.startswith(prefix))


# ---- parts against a real model -----------------------------------------------------------------------------

@pytest.mark.parametrize(("bits", "group_size", "dtype"), [(3, 64, "float32"), (2, 64, "bfloat16"),
                                                           (4, -1, "float32"), (8, 128, "bfloat16")])
def test_parts_equal_a_real_quantized_model_with_lora(bits, group_size, dtype):
    """Packed bytes, LoRA parameters and float bytes of a real model built, quantized and adapted by the engine."""
    config = llama_config(hidden=256, ffn=688, layers=2, heads=4, vocab=512)  # ffn 688: a ragged last group of 48
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    quantize_model(model, RTNQuantizer(bits=bits, group_size=group_size))
    add_lora(model, 8, 16.0, seed=0)
    plan = plan_for(model_shapes(config), bits=bits, group_size=group_size, rank=8, compute_dtype=dtype, tier="device")

    packed = sum(m.base.nbytes for m in model.modules() if isinstance(m, ModuLoRALinear))
    lora = sum(p.numel() for p in lora_parameters(model).values())
    floats = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    assert part_bytes(plan, "packed decoder weights") == packed
    assert part_bytes(plan, "LoRA weights") == 4 * lora
    assert part_bytes(plan, "LoRA gradients") == 4 * lora
    assert part_bytes(plan, "optimizer: Adam moments") == 8 * lora
    assert part_bytes(plan, "float params") == floats


# ---- published sizes ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "params"), [("llama-7b", 6.7e9), ("llama-13b", 13.0e9), ("llama-30b", 32.5e9),
                                              ("llama-65b", 65.2e9)])
def test_parameter_counts_match_the_llama_paper(name, params):
    """Touvron et al. 2023, Table 2 (three significant digits)."""
    assert model_shapes(load_config(name)).total_params == pytest.approx(params, rel=0.01)


def test_llama65b_packed_size_and_step_flops_match_textbook_formulas():
    """3 bits + a float16 scale and a 3-bit zero point per 64 weights; matmul FLOPs ~ 6 x params x tokens."""
    shapes = model_shapes(load_config("llama-65b"))
    plan = plan_for(shapes, tier="disk")
    linear = shapes.n_blocks * shapes.linear_params_per_block
    assert part_bytes(plan, "packed decoder weights") == pytest.approx(linear * (3 + 16 / 64 + 3 / 64) / 8, rel=1e-3)
    assert plan.time.compute_s * 150e12 == pytest.approx(6 * shapes.total_params * 512, rel=0.05)
    assert plan.time.io_s == pytest.approx(2 * part_bytes(plan, "packed decoder weights") / 1e9)
    assert plan.time.floor_s == max(plan.time.io_s, plan.time.compute_s)


# ---- placement ----------------------------------------------------------------------------------------------

def test_placement_moves_weights_off_the_device_only_when_needed():
    shapes = model_shapes(load_config("llama-65b"))
    two, three = plan_for(shapes, bits=2), plan_for(shapes, bits=3)
    assert (two.tier, two.fits, three.tier, three.fits) == ("device", True, "host", True)
    assert three.device_peak < 24 * GIB < three.device_peak + part_bytes(three, "packed decoder weights")
    cramped = plan_for(shapes, bits=2, device_mem=int(22.5 * GIB))  # weights fit only without the optimizer state
    assert (cramped.tier, cramped.optimizer_offloaded, cramped.fits) == ("device", True, True)


def test_on_a_cpu_host_tier_weights_count_in_device_memory():
    shapes = model_shapes(load_config("llama-65b"))
    roomy = plan_for(shapes, device="cpu", device_mem=64 * GIB, tier="host")
    assert roomy.fits and roomy.device_peak == roomy.host_peak > part_bytes(roomy, "packed decoder weights")
    tight = plan_for(shapes, device="cpu", device_mem=24 * GIB, host_mem=24 * GIB)
    assert (tight.tier, tight.fits) == ("disk", True)
    over = plan_for(shapes, device="cpu", device_mem=2 * GIB, host_mem=2 * GIB)
    assert not over.fits and over.verdict().startswith("does not fit: memory over by")


# ---- peak memory against real training steps ----------------------------------------------------------------

LLAMA_1024 = {"hidden": 1024, "ffn": 2816, "heads": 16, "seq_len": 512, "batch": 1, "bits": 3, "group_size": 64,
              "dtype": "bfloat16", "prefetch": 1}
RUNS = {
    "4 blocks, vocab 32000, resident": LLAMA_1024 | {"layers": 4, "vocab": 32000, "rank": 16, "tier": "device"},
    "8 blocks, vocab 4000, resident": LLAMA_1024 | {"layers": 8, "vocab": 4000, "rank": 8, "tier": "device"},
    "8 blocks, vocab 4000, disk": LLAMA_1024 | {"layers": 8, "vocab": 4000, "rank": 8, "tier": "disk"},
}


@pytest.mark.parametrize("name", RUNS)
@pytest.mark.slow
def test_predicted_peak_is_within_10_percent_of_a_measured_training_step(name, tmp_path):
    spec = RUNS[name] | {"block_dir": str(tmp_path / "blocks")}
    child = subprocess.run([sys.executable, __file__, json.dumps(spec)], capture_output=True, text=True,
                           env=os.environ | MEASURE_ENV, timeout=600)
    assert child.returncode == 0, child.stderr[-3000:]
    measured = json.loads(child.stdout.strip().splitlines()[-1])["peak"]

    shapes = model_shapes(llama_config(spec["hidden"], spec["ffn"], spec["layers"], spec["heads"], spec["vocab"]))
    same = {key: spec[key] for key in ("bits", "group_size", "rank", "seq_len", "batch", "tier", "prefetch")}
    plan = plan_for(shapes, device="cpu", device_mem=64 * GIB, host_mem=64 * GIB, optimizer_offload="no",
                    compute_dtype=spec["dtype"], **same)
    predicted = plan.device_peak - part_bytes(plan, "runtime: framework")  # the baseline holds the framework
    report = f"{name}: measured {measured / MIB:.1f} MiB, predicted {predicted / MIB:.1f} MiB"
    print(report)
    assert predicted == pytest.approx(measured, rel=TOLERANCE), report


# ---- sizes and the command line -----------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [("24GiB", 24 * GIB), ("64GB", 64 * 10**9), ("512MiB", 512 * MIB),
                                                ("1.5 GiB", 3 * GIB // 2), ("123456", 123456), ("2tib", 2 << 40)])
def test_sizes_parse(text, expected):
    assert parse_size(text) == expected


def modulora_in_process(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """The console entry point in this interpreter: exit code, stdout, stderr."""
    code = 0
    try:
        modulora_main(list(args))
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


LLAMA65B_PLAN = ("plan", "--model", "llama-65b", "--bits", "3", "--rank", "16", "--seq-len", "512", "--batch", "1",
                 "--device-mem", "24GiB", "--host-mem", "64GiB")


def test_cli_plan_says_whether_it_fits(capsys):
    code, out, err = modulora_in_process(capsys, *LLAMA65B_PLAN)
    assert code == 0, err
    assert "\nfits\n" in out and "peak device memory" in out and "step time" in out and "floor" in out
    code, out, _ = modulora_in_process(capsys, *LLAMA65B_PLAN[:-4], "--device-mem", "4GiB", "--host-mem", "16GiB")
    assert code == 0 and "\ndoes not fit: " in out


def test_cli_plan_json(capsys):
    on_cpu = [arg for arg in LLAMA65B_PLAN if arg not in ("--device-mem", "24GiB")]
    code, out, err = modulora_in_process(capsys, *on_cpu, "--device", "cpu", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["fits"] is True and report["inputs"]["device"] == "cpu"
    assert report["device_peak_bytes"] == report["host_peak_bytes"] == sum(
        part["nbytes"] for part in report["parts"] if part["where"] != "disk")


def test_cli_plan_takes_the_finetune_defaults(capsys):
    """Unset settings are the finetune's and the quantizer's defaults, read from their specs."""
    code, out, err = modulora_in_process(capsys, "plan", "--model", "llama-65b", "--bits", "3", "--device-mem", "24GiB",
                                         "--host-mem", "64GiB", "--json")
    assert code == 0, err
    inputs = json.loads(out)["inputs"]
    assert inputs["rank"] == LoraSpec().rank == 8 and inputs["batch"] == TrainSpec().batch_size == 8
    assert inputs["seq_len"] == default_of(DataSpec, "seq_len") == 256
    assert inputs["group_size"] == make_quantizer("rtn").group_size == 32  # `modulora quantize`'s default method
    assert inputs["prefetch"] == OffloadSpec().prefetch and inputs["compute_dtype"] == "bfloat16"


@pytest.mark.parametrize(("change", "needle"), [
    (("--device-mem", "24 parsecs"), "--device-mem: expected a size such as 24GiB, 64GB, 512MiB or a byte count, "
                                     "got '24 parsecs'"),
    (("--host-mem", "GiB"), "--host-mem: expected a size"),
    (("--model", "llama-3000b"), "unknown model 'llama-3000b'"),
])
def test_cli_plan_bad_input_is_one_line_exit_2(capsys, change, needle):
    args = list(LLAMA65B_PLAN)
    args[args.index(change[0]) + 1] = change[1]
    code, out, err = modulora_in_process(capsys, *args)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("modulora: error:") and needle in lines[0], err



# ---- the other stages on a GPU (modulora plan --stage ... --device cuda) -------------------------------------------

LLAMA7B_BLOCK_LINEAR = 4 * 4096 * 4096 + 3 * 4096 * 11008  # q, k, v, o; gate, up, down (the LLaMA paper's shapes)
LLAMA7B_BLOCK_FLOAT = (LLAMA7B_BLOCK_LINEAR + 2 * 4096) * 2  # and two RMS norms, in bfloat16


def stage_json(capsys: pytest.CaptureFixture[str], device: str, *args: str) -> dict[str, Any]:
    memory = ["--device-mem", "24GiB"] if device == "cuda" else []
    code, out, err = modulora_in_process(capsys, "plan", "--model", "llama-7b", "--source-dtype", "bfloat16",
                                         "--device", device, "--host-mem", "64GiB", *memory, *args, "--json")
    assert code == 0, err
    return json.loads(out)


def part_nbytes(report: dict[str, Any], where: str) -> int:
    return sum(part["nbytes"] for part in report["parts"] if part["where"] == where)


def test_quantizing_on_a_gpu_puts_the_block_and_the_quantizer_on_the_device(capsys):
    """RTN on a 7B shape: the device holds the block's bfloat16 weights, the quantizer's five float32 copies of
    the largest layer (down_proj) and the CUDA runtime; the host keeps what the CPU plan has but the quantizer's
    work (the block is read there on its way to the device, its packed weights written from there)."""
    cpu = stage_json(capsys, "cpu", "--stage", "quantize", "--method", "rtn", "--bits", "3")
    cuda = stage_json(capsys, "cuda", "--stage", "quantize", "--method", "rtn", "--bits", "3")
    work = 5 * 11008 * 4096 * 4
    assert cuda["device_peak_bytes"] == GIB + LLAMA7B_BLOCK_FLOAT + work
    assert cuda["host_peak_bytes"] == cpu["host_peak_bytes"] - work
    assert "device_peak_bytes" not in cpu and part_nbytes(cpu, "device") == 0


def test_calibrating_on_a_gpu_keeps_the_windows_on_the_device_and_says_when_it_is_short(capsys):
    """Calibrated OPTQ (GPTAQ's float twin, 32 windows of 512 tokens): the windows' hidden states (quantized and
    float, bfloat16), the float twin and the block as it is at the peak are device memory, the input embeddings no
    longer (released once the windows are embedded); a 3 GiB device is refused naming device memory, while the host
    is untouched."""
    calib = ["--stage", "quantize", "--method", "optq", "--bits", "3", "--calib-windows", "32",
             "--calib-seq-len", "512"]
    cuda = stage_json(capsys, "cuda", *calib)
    on_device = {part["name"].split(" (")[0]: part["nbytes"] for part in cuda["parts"] if part["where"] == "device"}
    assert on_device["hidden states of 32 windows x 512 tokens"] == 2 * 32 * 512 * 4096 * 2
    assert on_device["the block's float twin"] == LLAMA7B_BLOCK_FLOAT
    # the peak is down_proj's quantizing: the block then holds down_proj and the norms in bfloat16 and the six
    # layers before it packed (3-bit codes, with group-64 scales and zero points under half a byte per weight)
    before = 4 * 4096 * 4096 + 2 * 11008 * 4096
    unpacked = (11008 * 4096 + 2 * 4096) * 2
    assert unpacked + before * 3 / 8 < on_device["the block at the peak"] < unpacked + before / 2
    assert not any("embeddings" in name for name in on_device)
    assert cuda["fits"] and cuda["device_peak_bytes"] == sum(on_device.values())
    code, out, err = modulora_in_process(capsys, "plan", "--model", "llama-7b", "--source-dtype", "bfloat16",
                                         "--device", "cuda", "--device-mem", "3GiB", "--host-mem", "64GiB", *calib)
    assert code == 0, err
    verdict = out.strip().splitlines()[-1]
    assert verdict.startswith("does not fit: device memory over by") and "host memory" not in verdict, out


def test_ray_calibration_plans_each_worker_as_one_process_of_its_windows_and_a_driver_without_statistics(capsys):
    """``modulora calibrate --workers 2`` with 64 windows (two 32-window shards, one per worker): the statistics
    are summed and used on the workers, so each worker is planned as a one-process quantize of its 32 windows but
    for the block it does not write, and the driver holds no statistics, on its CPU (a GPU run's driver too: its
    host peak is the CPU run's), while each worker's device holds its windows, quantized and float."""
    calib = ["--stage", "calibrate", "--method", "optq", "--bits", "3", "--calib-windows", "64",
             "--calib-seq-len", "512", "--workers", "2"]
    alone = ["--stage", "quantize", "--method", "optq", "--bits", "3", "--calib-windows", "32", "--calib-seq-len", "512"]
    plans = {}
    for device in ("cpu", "cuda"):
        ray, one = stage_json(capsys, device, *calib), stage_json(capsys, device, *alone)
        written = [p for p in one["parts"] if p["name"].startswith("one block's packed weights, written")]
        assert len(written) == (device == "cuda")  # host memory beside the device's peak; on a CPU, after it
        assert ray["worker_parts"] == [p for p in one["parts"] if p not in written]
        assert not [p["name"] for p in ray["parts"] if "statistics" in p["name"] and "Ray's messages" not in p["name"]]
        plans[device] = ray
    cpu, cuda = plans["cpu"], plans["cuda"]
    assert cuda["host_peak_bytes"] == cpu["host_peak_bytes"] and part_nbytes(cuda, "device") == 0
    hidden = next(p["nbytes"] for p in cuda["worker_parts"] if p["name"].startswith("hidden states"))
    assert hidden == 2 * 32 * 512 * 4096 * 2  # 32 windows each, quantized and float, bfloat16
    assert cuda["device_peak_bytes"] == sum(p["nbytes"] for p in cuda["worker_parts"] if p["where"] == "device")


def test_ray_calibration_workers_hold_whole_shards(capsys):
    """32 windows are one 32-window shard: one worker holds them all, however many are asked for; in 16-window
    shards each of two workers holds one.  One process with two shards holds their sum and one shard's statistics
    (down_proj's float32 sums and GPTAQ's cross statistics: twice 2 x 11008^2 x 4 bytes)."""
    calib = ["--method", "optq", "--bits", "3", "--calib-windows", "32", "--calib-seq-len", "512"]

    def hidden(plan: dict[str, Any]) -> int:
        return next(p["nbytes"] for p in plan["worker_parts"] if p["name"].startswith("hidden states"))

    assert hidden(stage_json(capsys, "cpu", "--stage", "calibrate", *calib, "--workers", "2")) == 2 * 32 * 512 * 4096 * 2
    halves = stage_json(capsys, "cpu", "--stage", "calibrate", *calib, "--workers", "2", "--calib-shard-windows", "16")
    assert hidden(halves) == 2 * 16 * 512 * 4096 * 2

    plan = stage_json(capsys, "cpu", "--stage", "quantize", *calib, "--calib-shard-windows", "16")
    held = next(p["nbytes"] for p in plan["parts"] if p["name"].startswith("statistics of the largest group, 2 shards'"))
    assert 4 * 11008**2 * 4 < held < 4 * 11008**2 * 4 + GIB  # and one forward pass of 8 windows


if __name__ == "__main__":
    print(json.dumps(measure_step(json.loads(sys.argv[1]))))


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_data_parallel_workers_each_plan_their_share_and_the_node_holds_them_all(device, capsys):
    """``--train-workers 2 --batch 8``: each worker is a one-process run of batch 4 on a device of its own; the
    node's host memory (on a CPU, the one memory) holds both."""
    machine = ["plan", "--model", "llama-7b", "--bits", "4", "--device", device, "--host-mem", "64GiB", "--json",
               *(["--device-mem", "24GiB"] if device == "cuda" else [])]
    plans = []
    for extra in (["--batch", "4"], ["--batch", "8", "--train-workers", "2"]):
        code, out, err = modulora_in_process(capsys, *machine, *extra)
        assert code == 0, err
        plans.append(json.loads(out))
    one, two = plans
    assert two["inputs"]["batch"] == 4 and two["inputs"]["workers"] == 2 and two["parts"] == one["parts"]
    assert two["host_peak_bytes"] == 2 * one["host_peak_bytes"]
    assert two["device_peak_bytes"] == (one["device_peak_bytes"] if device == "cuda" else 2 * one["device_peak_bytes"])
    assert two["time"] == one["time"]
