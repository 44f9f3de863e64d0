"""Data formats on the shared files: loss masks, packing, column errors."""

from __future__ import annotations

import json

import pytest

from conftest import SHARED, TRAIN_TXT
from engine.data import IGNORE, FormatSpec, build_examples, collate
from engine.errors import EngineError

DATA = SHARED / "data"


def answer(tokenizer, example) -> str:
    return tokenizer.decode([t for t, label in zip(example.input_ids, example.labels) if label != IGNORE])


def test_text_is_packed_into_full_windows(float_model):
    tokenizer = float_model[1]
    examples = build_examples(TRAIN_TXT, FormatSpec("text"), tokenizer, 128)
    assert len(examples) > 100
    assert all(len(e.input_ids) == 128 and e.labels == e.input_ids for e in examples)
    assert examples[0].input_ids[0] == tokenizer.bos_token_id


def test_alpaca_loss_only_on_the_response(float_model):
    tokenizer = float_model[1]
    rows = json.loads((DATA / "alpaca" / "alpaca_1k.json").read_text())
    examples = build_examples(DATA / "alpaca" / "alpaca_1k.json", FormatSpec("alpaca"), tokenizer, 512, limit=5)
    for row, example in zip(rows, examples):
        assert answer(tokenizer, example).replace("</s>", "").strip() == row["output"].strip()
        assert "### Response:" in tokenizer.decode(example.input_ids)


def test_classification_label_words(float_model):
    tokenizer = float_model[1]
    spec = FormatSpec("classification", label_words={"0": "negative", "1": "positive"})
    examples = build_examples(DATA / "sst2" / "dev.tsv", spec, tokenizer, 256, limit=20)
    assert {answer(tokenizer, e).replace("</s>", "").strip() for e in examples} == {"negative", "positive"}


def test_summarization_and_rte_columns(float_model, tmp_path):
    tokenizer = float_model[1]
    summaries = build_examples(DATA / "samsum" / "validation.csv", FormatSpec("summarization"), tokenizer, 256, limit=3)
    assert all(len(e.input_ids) <= 256 and e.input_ids[0] == tokenizer.bos_token_id for e in summaries)
    spec = FormatSpec("classification", columns={"text": "sentence1"}, template="{sentence1}\nQuestion: {sentence2}\nAnswer:")
    rte = build_examples(DATA / "rte" / "dev.tsv", spec, tokenizer, 256, limit=4)
    assert {answer(tokenizer, e).replace("</s>", "").strip() for e in rte} <= {"entailment", "not_entailment"}


def test_chat_without_template_trains_assistant_turns(float_model, tmp_path):
    tokenizer = float_model[1]
    path = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": "Tell a story."}, {"role": "assistant", "content": "Once upon a time."}]}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    (example,) = build_examples(path, FormatSpec("chat"), tokenizer, 64)
    assert "Once upon a time." in answer(tokenizer, example)
    assert "Tell a story" not in answer(tokenizer, example)


def test_collate_pads_and_masks(float_model):
    tokenizer = float_model[1]
    examples = build_examples(DATA / "sst2" / "dev.tsv", FormatSpec("classification"), tokenizer, 256, limit=4)
    batch = collate(examples, pad_id=0)
    lengths = [len(e.input_ids) for e in examples]
    assert batch["input_ids"].shape == (4, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE).all()


@pytest.mark.parametrize(
    "path,spec,needle",
    [
        (DATA / "sst2" / "dev.tsv", FormatSpec("classification", columns={"text": "review"}), "missing column 'review'"),
        (DATA / "alpaca" / "alpaca_1k.json", FormatSpec("summarization"), "missing column 'dialogue'"),
        (DATA / "nope.csv", FormatSpec("text"), "no such file"),
        (DATA / "sst2" / "dev.tsv", FormatSpec("poetry"), "unknown data format 'poetry'"),
    ],
)
def test_bad_data_names_file_and_column(float_model, path, spec, needle):
    with pytest.raises(EngineError, match=needle) as info:
        build_examples(path, spec, float_model[1], 64)
    assert "\n" not in str(info.value)
