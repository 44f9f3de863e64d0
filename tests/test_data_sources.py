"""Data in the forms people keep it: compressed files, ``datasets`` folders (with splits), hub ids offline; and chat
and instruction data evaluated by the perplexity of what they train on."""

from __future__ import annotations

import gzip
import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import GGUF_MODEL, SHARED, modulora
from engine.data import IGNORE, FormatSpec, build_examples
from engine.errors import EngineError
from engine.eval import task_metric

ALPACA = SHARED / "data" / "alpaca" / "alpaca_1k.json"


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """The first 64 Alpaca rows as a chat JSONL file, the same gzipped, and as datasets folders."""
    import datasets

    work = tmp_path_factory.mktemp("sources")
    rows = json.loads(ALPACA.read_text())
    chats = [{"messages": [{"role": "user", "content": r["instruction"] + ("\n" + r["input"] if r["input"] else "")},
                           {"role": "assistant", "content": r["output"]}]} for r in rows[:64]]
    lines = "\n".join(json.dumps(c) for c in chats)
    (work / "chat.jsonl").write_text(lines)
    with gzip.open(work / "chat.jsonl.gz", "wt") as f:
        f.write(lines)
    (work / "alpaca.json").write_text(json.dumps(rows[:64]))
    (work / "valid.json").write_text(json.dumps(rows[64:96]))
    datasets.Dataset.from_list(rows[:64]).save_to_disk(str(work / "folder"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:64]),
                          "validation": datasets.Dataset.from_list(rows[64:96])}).save_to_disk(str(work / "splits"))
    return {p.name: p for p in work.iterdir()}


@pytest.mark.parametrize(("given", "split", "fmt", "reference"), [
    ("chat.jsonl.gz", None, "chat", "chat.jsonl"),
    ("folder", None, "alpaca", "alpaca.json"),
    ("splits", None, "alpaca", "alpaca.json"),
    ("splits", "validation", "alpaca", "valid.json"),
])
def test_each_form_gives_the_examples_of_the_plain_file(sources, float_model, given, split, fmt, reference):
    tokenizer = float_model[1]
    got = build_examples(sources[given], FormatSpec(fmt, split=split), tokenizer, 256)
    want = build_examples(sources[reference], FormatSpec(fmt), tokenizer, 256)
    assert len(got) == len(want) > 0 and got == want


@pytest.mark.parametrize(("given", "split", "says"), [
    ("splits", "test", "no split 'test'; it has train, validation (choose one with --split)"),
    ("folder", "validation", "holds one dataset, not splits"),
    ("chat.jsonl", "validation", "a single file has no split 'validation'"),
])
def test_a_split_that_is_not_there_is_named(sources, float_model, given, split, says):
    with pytest.raises(EngineError, match=re.escape(says)):
        build_examples(sources[given], FormatSpec("chat", split=split), float_model[1], 256)


def test_a_hub_id_offline_says_the_hub_was_tried(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = modulora("eval", GGUF_MODEL, "--data", "tatsu-lab/alpaca", "--format", "alpaca", "--limit", 2)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("modulora: error: tatsu-lab/alpaca: not a local file or folder, and the hub dataset "
                               "could not be had")


def test_chat_perplexity_is_over_the_assistant_turns(sources, float_model):
    """Against each example scored alone, unpadded, in float64: the mean NLL of its labelled tokens."""
    model, tokenizer = float_model
    examples = build_examples(sources["chat.jsonl"], FormatSpec("chat"), tokenizer, 256, limit=6)
    total, count = 0.0, 0
    with torch.no_grad():
        for e in examples:
            logits = model(input_ids=torch.tensor([e.input_ids])).logits[0, :-1].double()
            labels = torch.tensor(e.labels[1:])
            keep = labels != IGNORE
            total += F.cross_entropy(logits[keep], labels[keep], reduction="sum").item()
            count += int(keep.sum())
    metric = task_metric("chat", str(sources["chat.jsonl"]), tokenizer, FormatSpec("chat"), 6, 256, 4, False)(model)
    assert metric["tokens"] == count and count < sum(len(e.input_ids) for e in examples)  # prompts are not scored
    assert metric["ppl"] == pytest.approx(math.exp(total / count), rel=1e-6)


def test_finetune_on_a_gzipped_chat_file_and_evaluate_it(sources, tmp_path, capsys):
    data = ("--data", sources["chat.jsonl.gz"], "--format", "chat", "--limit", 8, "--seq-len", 128)
    assert modulora("finetune", GGUF_MODEL, *data, "--steps", 2, "--batch-size", 4, "--rank", 4, "--save-every", 0,
                    "--out", tmp_path / "run") == 0
    capsys.readouterr()
    assert modulora("eval", tmp_path / "run", *data, "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "chat" and report["tokens"] > 0 and math.isfinite(report["ppl"])
