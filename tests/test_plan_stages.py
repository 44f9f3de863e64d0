"""The stage planner (``modulora plan --stage``) against the commands it plans, measured whole-process.

A random bfloat16 Llama checkpoint (hidden 1024, one block, vocabulary 32000: the block and the vocabulary
tables matter next to the framework) in the Hugging Face sharded layout is quantized, evaluated and exported by
the real commands under ``/usr/bin/time -v``; each peak must be within the planner's tolerance of its plan.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import GGUF_MODEL, TRAIN_TXT, VALID_TXT
from engine.model import open_source

pytestmark = [pytest.mark.slow,  # real commands on a 1024-wide model, each in its own process
              pytest.mark.timeout(1800)]  # the first test also builds the module's quantized directories

TOLERANCE = 0.15  # the bound for the stage rows (docs/scale.md)
SHAPE = {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 1, "num_attention_heads": 16,
         "num_key_value_heads": 16, "vocab_size": 32000, "tie_word_embeddings": False}
ENV = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("plan-stages") / "ckpt"
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", **SHAPE)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(path, max_shard_size="40MB")
    open_source(GGUF_MODEL).tokenizer().save_pretrained(path)
    assert len(list(path.glob("model-*.safetensors"))) > 2
    return path


def peak_gib(*args: object) -> float:
    """``modulora ARGS`` under ``/usr/bin/time -v``: its peak RSS, GiB."""
    done = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-m", "engine.cli", *map(str, args)], env=ENV,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1)) / (1 << 20)


def planned_gib(checkpoint: Path, *args: object) -> float:
    done = subprocess.run([sys.executable, "-m", "engine.cli", "plan", "--model", checkpoint / "config.json",
                           "--device", "cpu", "--host-mem", "24GiB", *map(str, args), "--json"],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)["host_peak_bytes"] / (1 << 30)


CALIB = ["--calib-windows", 16, "--calib-seq-len", 256]


@pytest.fixture(scope="module")
def quantized(checkpoint, tmp_path_factory) -> dict[str, tuple[float, float, Path]]:
    """Each method's directory with its measured and planned peaks."""
    out = {}
    root = tmp_path_factory.mktemp("quantized")
    for method, extra in {"rtn": ["--bits", 3, "--group-size", 32],
                          "optq": ["--bits", 3, "--group-size", 64, *CALIB],
                          "quip": ["--bits", 2, *CALIB]}.items():
        calib = ["--calib", TRAIN_TXT] if method != "rtn" else []
        fast = ["--tune-iters", 1] if method == "quip" else []  # fewer refining passes: the same tensors, less time
        measured = peak_gib("quantize", checkpoint, "--method", method, *extra, *calib, *fast, "--out", root / method)
        planned = planned_gib(checkpoint, "--stage", "quantize", "--method", method, *extra)
        out[method] = (measured, planned, root / method)
    return out


@pytest.mark.parametrize("method", ["rtn", "optq", "quip"])
def test_quantize_peak_is_planned(quantized, method):
    measured, planned, _ = quantized[method]
    assert planned == pytest.approx(measured, rel=TOLERANCE), f"{method}: measured {measured:.3f}, planned {planned:.3f}"


def test_eval_on_the_disk_tier_peak_is_planned(checkpoint, quantized):
    directory = quantized["rtn"][2]
    measured = peak_gib("eval", directory, "--data", VALID_TXT, "--seq-len", 256, "--limit", 4, "--batch-size", 4,
                        "--offload", "disk")
    planned = planned_gib(checkpoint, "--stage", "eval", "--bits", 3, "--group-size", 32, "--seq-len", 256,
                          "--batch", 4, "--tier", "disk")
    assert planned == pytest.approx(measured, rel=TOLERANCE), f"measured {measured:.3f}, planned {planned:.3f}"
