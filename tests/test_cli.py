"""The ``modulora`` command: real runs on the shared model, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import GGUF_MODEL, TRAIN_TXT, VALID_TXT
from conftest import modulora as modulora_here


def modulora(*args: str) -> subprocess.CompletedProcess:
    """The real console entry point in a fresh interpreter."""
    return subprocess.run([sys.executable, "-m", "engine.cli", *map(str, args)], capture_output=True, text=True)


def modulora_in_process(capsys, *args: str) -> tuple[int, str, str]:
    """Same entry point, in this interpreter (saves the import time of a subprocess)."""
    from engine.cli import main

    code = 0
    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def q3_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "q3"
    assert modulora_here("quantize", GGUF_MODEL, "--method", "rtn", "--bits", "3", "--group-size", "32", "--out", out) == 0
    return out


@pytest.mark.slow
def test_eval_float_model_json():
    result = modulora("eval", GGUF_MODEL, "--data", VALID_TXT, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["ppl"] == pytest.approx(4.49, rel=0.01)
    assert report["bits_per_weight"] == 32.0
    assert report["tokens"] == 768 * 255


def test_quantize_eval_info(q3_dir, capsys):
    code, out, err = modulora_in_process(capsys, "eval", q3_dir, "--data", VALID_TXT, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["ppl"] == pytest.approx(7.90, rel=0.02)
    assert 3.5 < report["bits_per_weight"] < 3.75
    code, out, err = modulora_in_process(capsys, "info", q3_dir)
    assert code == 0, err
    assert "bits=3" in out and "35 (groupwise)" in out
    manifest = json.loads(modulora_in_process(capsys, "info", q3_dir, "--json")[1])
    assert manifest["quantizer"] == {"method": "rtn", "bits": 3, "group_size": 32, "symmetric": False}


@pytest.mark.parametrize(
    "args,needle",
    [
        (["quantize", "missing.gguf", "--bits", "4", "--out", "o"], "missing.gguf: no such file"),
        (["quantize", GGUF_MODEL, "--bits", "5", "--out", "o"], "--bits: expected one of 2, 3, 4, 8, got 5"),
        (["quantize", GGUF_MODEL, "--group-size", "0", "--out", "o"], "--group-size: expected a positive integer or -1"),
        (["quantize", GGUF_MODEL, "--method", "magic", "--out", "o"], "unknown quantization method 'magic'"),
        (["quantize", GGUF_MODEL], "Missing option '--out'"),
        (["eval", "tests", "--data", VALID_TXT], "not a model directory"),
        (["eval", GGUF_MODEL, "--data", "nowhere.txt"], "nowhere.txt: no such file"),
        (["eval", GGUF_MODEL, "--data", VALID_TXT, "--seq-len", "1"], "--seq-len: expected an integer >= 2, got 1"),
        (["eval", GGUF_MODEL, "--data", VALID_TXT, "--format", "poetry"], "'poetry' is not one of"),
        (["finetune", GGUF_MODEL, "--data", VALID_TXT, "--out", "o", "--lr", "inf"], "--lr: expected a number > 0"),
        (["finetune", GGUF_MODEL, "--data", VALID_TXT, "--out", "o", "--rank-max", "4"],
         "--rank-max: only for a dynamic-rank run; set --dynamic"),
        (["finetune", GGUF_MODEL, "--data", VALID_TXT, "--out", "o", "--eval-every", "5"],
         "--eval-every: needs --eval-data"),
        (["finetune", GGUF_MODEL, "--data", VALID_TXT, "--out", "o", "--offload-dir", "b"],
         "--offload-dir: only the disk tier keeps block files, but --offload is None"),
        (["correct", GGUF_MODEL, "--calib", VALID_TXT, "--out", "o", "--ce-weight", "nan"],
         "--ce-weight: expected a number >= 0, got nan"),
        (["plan", "--model", "llama-7b", "--host-mem", "8GiB"], "--device-mem: required for device cuda"),
        (["info", "tests"], "not a quantized model directory"),
        (["info", "no/such/dir"], "no such directory"),
        (["frobnicate"], "No such command"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, needle, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(Path(__file__).resolve().parent.parent)
    args = [tmp_path / a if a in ("o", "b") else a for a in args]  # outputs (and their locks) outside the repo
    code, out, err = modulora_in_process(capsys, *args)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("modulora: error:"), err
    assert needle in lines[0]


SST2_DEV = GGUF_MODEL.parents[1] / "data" / "sst2" / "dev.tsv"


@pytest.mark.parametrize(
    "case,needle",
    [
        ("gguf-garbage", "not a readable GGUF file"),
        ("gguf-bad-version", "not a readable GGUF file"),
        ("template-unknown-field", "--template '{nope}\\nAnswer:': cannot be filled (KeyError: 'nope'); it may use"),
        ("template-unclosed", "--template '{text': cannot be filled (ValueError"),
        ("template-positional", "--template '{text}{0}': cannot be filled (IndexError"),
        ("template-conversion", "--template '{text!z}': cannot be filled (ValueError"),
        ("lr-overflows-float32", "--lr: expected a number > 0 and <= 10, got 1e+38"),
        ("ray-address-unreachable", "--address 127.0.0.1:1: no Ray cluster answers there"),
    ],
)
def test_bad_files_and_values_are_one_line_exit_2(case, needle, tmp_path, capsys):
    """Inputs an audit found ending in tracebacks: damaged GGUF files, templates that cannot be filled, a
    learning rate that overflows the optimizer's float32 arithmetic."""
    import random

    rng = random.Random(0)
    garbage = tmp_path / "bad.gguf"
    finetune = ["finetune", GGUF_MODEL, "--steps", "1", "--out", tmp_path / "run"]
    classify = [*finetune, "--data", SST2_DEV, "--format", "classification", "--limit", "4", "--label-word", "0=negative",
                "--label-word", "1=positive"]
    args = {
        "gguf-garbage": ["quantize", garbage, "--out", tmp_path / "q"],
        "gguf-bad-version": ["quantize", garbage, "--out", tmp_path / "q"],
        "template-unknown-field": [*classify, "--template", "{nope}\nAnswer:"],
        "template-unclosed": [*classify, "--template", "{text"],
        "template-positional": [*classify, "--template", "{text}{0}"],
        "template-conversion": [*classify, "--template", "{text!z}"],
        "lr-overflows-float32": [*finetune, "--data", TRAIN_TXT, "--lr", "1e38"],
        "ray-address-unreachable": ["calibrate", GGUF_MODEL, "--address", "127.0.0.1:1", "--method", "optq", "--calib",
                                    TRAIN_TXT, "--out", tmp_path / "q"],
    }[case]
    body = bytes(rng.randrange(256) for _ in range(100))
    garbage.write_bytes(b"GGUF" + body if case == "gguf-bad-version" else body)
    code, out, err = modulora_in_process(capsys, *args)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("modulora: error:"), err
    assert needle in lines[0]


@pytest.mark.slow
def test_corrupt_quantized_dir_is_refused_by_the_real_command(q3_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(q3_dir, broken)
    weights = broken / "blocks" / "block_00002.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    result = modulora("eval", broken, "--data", VALID_TXT)
    assert result.returncode == 2
    assert "truncated" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr
