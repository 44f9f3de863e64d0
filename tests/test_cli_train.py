"""finetune / correct / eval --ranks / export through the real command, on the shared model and data."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from conftest import GGUF_MODEL, SHARED, TRAIN_TXT, VALID_TXT
from test_cli import modulora_in_process

SST2 = SHARED / "data" / "sst2"


@pytest.fixture(scope="module")
def q4_dir(tmp_path_factory):
    from engine.cli import main

    out = tmp_path_factory.mktemp("q") / "q4"
    main(["quantize", str(GGUF_MODEL), "--bits", "4", "--out", str(out)])  # returns normally on success
    return out


def test_correct_then_eval_with_adapter(q4_dir, tmp_path, capsys):
    out = tmp_path / "corrected"
    code, _, err = modulora_in_process(capsys, "correct", q4_dir, "--calib", TRAIN_TXT, "--out", out, "--rank", "4",
                                       "--steps", "6", "--limit", "16", "--batch-size", "4")
    assert code in (0, None), err
    code, stdout, err = modulora_in_process(capsys, "eval", out, "--data", VALID_TXT, "--limit", "16", "--json")
    assert code in (0, None), err
    report = json.loads(stdout)
    assert report["adapter_bytes"] == sum(4 * (i + o) * 4 for i, o in _shapes())  # rank 4, float32 A and B
    assert report["bits_per_weight_with_adapter"] > report["bits_per_weight"]
    assert report["ppl"] < 6


def _shapes():
    """(in, out) of the 7 decoder linears of each of the 5 blocks."""
    q, kv, ffn = (64, 64), (64, 32), (64, 172)
    per_block = [q, kv, kv, q, ffn, ffn, (172, 64)]
    return per_block * 5


def test_dynamic_finetune_eval_ranks_and_export(tmp_path, capsys, float_model):
    run = tmp_path / "run"
    code, _, err = modulora_in_process(
        capsys, "finetune", GGUF_MODEL, "--data", SST2 / "train.tsv", "--format", "classification",
        "--label-word", "0=negative", "--label-word", "1=positive", "--limit", "64", "--steps", "4",
        "--batch-size", "4", "--rank-max", "4", "--dynamic", "--out", run,
    )
    assert code in (0, None), err
    code, stdout, err = modulora_in_process(
        capsys, "eval", run, "--data", SST2 / "dev.tsv", "--format", "classification", "--label-word", "0=negative",
        "--label-word", "1=positive", "--limit", "20", "--ranks", "1,4", "--json",
    )
    assert code in (0, None), err
    ranks = json.loads(stdout)["ranks"]
    assert set(ranks) == {"1", "4"} and all(0 <= r["accuracy"] <= 1 and r["rows"] == 20 for r in ranks.values())
    code, _, err = modulora_in_process(capsys, "export", run, "--rank", "2", "--merged", "--out", tmp_path / "exp")
    assert code in (0, None), err
    config = json.loads((tmp_path / "exp" / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["modulora_trained_rank"] == 4
    peft = PeftModel.from_pretrained(copy.deepcopy(float_model[0]), tmp_path / "exp" / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "exp" / "merged")  # sharded, with its index
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, peft(input_ids=ids).logits, atol=1e-4)


@pytest.mark.parametrize(
    "args,needle",
    [
        (["finetune", GGUF_MODEL, "--data", TRAIN_TXT, "--out", "o", "--dynamic"],
         "--rank-max: required when --dynamic is true"),
        (["finetune", GGUF_MODEL, "--data", TRAIN_TXT, "--out", "o", "--rank", "0"], "--rank: expected an integer >= 1"),
        (["finetune", GGUF_MODEL, "--data", SST2 / "dev.tsv", "--format", "classification", "--column", "text=review",
          "--label-word", "0=negative", "--out", "o"], "missing column 'review'"),
        (["finetune", GGUF_MODEL, "--data", SST2 / "dev.tsv", "--format", "classification", "--out", "o"],
         "--label-word: a classification set needs its label words"),
        (["finetune", GGUF_MODEL, "--data", TRAIN_TXT, "--out", "o", "--column", "oops"],
         "'--column': takes KEY=VALUE, got 'oops'"),
        (["correct", GGUF_MODEL, "--calib", TRAIN_TXT, "--out", "o"], "not a quantized model directory"),
        (["eval", GGUF_MODEL, "--data", VALID_TXT, "--ranks", "a,b"], "'--ranks': takes comma-separated integers"),
        (["export", "nowhere", "--out", "o"], "not an adapter directory"),
    ],
)
def test_bad_training_input_is_one_line_exit_2(args, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = modulora_in_process(capsys, *args)
    assert code == 2, (out, err)
    assert len(err.strip().splitlines()) == 1 and needle in err
