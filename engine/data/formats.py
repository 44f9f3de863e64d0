"""Turn rows into token sequences with a loss mask, one function per data format.

Every supervised format renders a row as *segments* — ``(text, trainable)``
pairs — so the loss covers only the answer (Alpaca response, label word,
summary, assistant turns).  ``text`` is different: the whole corpus is packed
into windows of ``seq_len`` tokens, loss on every token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedTokenizerBase

from engine.errors import EngineError

IGNORE = -100
Segments = list[tuple[str, bool]]

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


@dataclass
class FormatSpec:
    """How to read one data format: its name, column names and prompt pieces."""

    name: str
    columns: dict[str, str] = field(default_factory=dict)
    template: str | None = None
    label_words: dict[str, str] = field(default_factory=dict)
    split: str | None = None  # of a datasets folder or hub dataset with several (default: train)

    def column(self, role: str) -> str:
        return self.columns.get(role, DEFAULT_COLUMNS[self.name][role])

    def required_columns(self) -> list[str]:
        return [self.column(role) for role in DEFAULT_COLUMNS[self.name]]


DEFAULT_COLUMNS: dict[str, dict[str, str]] = {
    "text": {"text": "text"},
    "alpaca": {"instruction": "instruction", "input": "input", "output": "output"},
    "classification": {"text": "sentence", "label": "label"},
    "summarization": {"document": "dialogue", "summary": "summary"},
    "chat": {"messages": "messages"},
}
FORMATS = tuple(DEFAULT_COLUMNS)
DEFAULT_TEMPLATES = {"classification": "{text}\nAnswer:", "summarization": "{document}\nSummary:"}


def check_format(name: str) -> None:
    if name not in FORMATS:
        raise EngineError(f"unknown data format {name!r}; allowed: {', '.join(FORMATS)}")


def label_word(spec: FormatSpec, label: Any) -> str:
    return spec.label_words.get(str(label), str(label))


def render(template: str, fields: dict[str, Any]) -> str:
    """``template`` filled from a row's ``fields``; a template that does not parse or names other fields is a
    one-line error listing the fields it may use."""
    try:
        return template.format(**fields)
    except (KeyError, IndexError, ValueError, AttributeError) as exc:
        raise EngineError(f"--template {template!r}: cannot be filled ({type(exc).__name__}: {exc}); it may use "
                          f"{', '.join('{' + str(k) + '}' for k in fields)}") from None


def classification_prompt(spec: FormatSpec, row: dict[str, Any]) -> str:
    return render(spec.template or DEFAULT_TEMPLATES["classification"], {**row, "text": row[spec.column("text")]})


def summarization_prompt(spec: FormatSpec, row: dict[str, Any]) -> str:
    return render(spec.template or DEFAULT_TEMPLATES["summarization"],
                  {**row, "document": row[spec.column("document")]})


def alpaca_segments(spec: FormatSpec, row: dict[str, Any], tokenizer: PreTrainedTokenizerBase) -> Segments:
    context = row.get(spec.column("input")) or ""
    template = ALPACA_WITH_INPUT if context.strip() else ALPACA_NO_INPUT
    prompt = template.format(instruction=row[spec.column("instruction")], input=context)
    return [(prompt, False), (row[spec.column("output")], True)]


def classification_segments(spec: FormatSpec, row: dict[str, Any], tokenizer: PreTrainedTokenizerBase) -> Segments:
    return [(classification_prompt(spec, row), False), (" " + label_word(spec, row[spec.column("label")]), True)]


def summarization_segments(spec: FormatSpec, row: dict[str, Any], tokenizer: PreTrainedTokenizerBase) -> Segments:
    return [(summarization_prompt(spec, row), False), (" " + row[spec.column("summary")].strip(), True)]


def chat_segments(spec: FormatSpec, row: dict[str, Any], tokenizer: PreTrainedTokenizerBase) -> Segments:
    """Assistant turns are trainable; rendered with the tokenizer's chat template when it has one."""
    messages = row[spec.column("messages")]
    if not isinstance(messages, list) or not all(isinstance(m, dict) and {"role", "content"} <= m.keys() for m in messages):
        raise EngineError(f"chat rows need a list of {{role, content}} messages in column {spec.column('messages')!r}")
    if getattr(tokenizer, "chat_template", None):
        segments: Segments = []
        rendered = ""
        for i, message in enumerate(messages):
            full = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
            segments.append((full[len(rendered) :], message["role"] == "assistant"))
            rendered = full
        return segments
    return [(f"<|{m['role']}|>\n{m['content']}\n", m["role"] == "assistant") for m in messages]


SEGMENTERS: dict[str, Callable[[FormatSpec, dict[str, Any], PreTrainedTokenizerBase], Segments]] = {
    "alpaca": alpaca_segments,
    "classification": classification_segments,
    "summarization": summarization_segments,
    "chat": chat_segments,
}


def encode_segments(segments: Segments, tokenizer: PreTrainedTokenizerBase, max_len: int) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)``: BOS first, EOS after the answer; long prompts lose their beginning."""
    ids: list[int] = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    labels: list[int] = [IGNORE] * len(ids)
    for text, trainable in segments:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if trainable else [IGNORE] * len(piece)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    if len(ids) > max_len:
        cut = len(ids) - max_len
        head = 1 if tokenizer.bos_token_id is not None else 0
        ids = ids[:head] + ids[head + cut :]
        labels = labels[:head] + labels[head + cut :]
    return ids, labels


def pack_text(texts: list[str], tokenizer: PreTrainedTokenizerBase, seq_len: int) -> list[list[int]]:
    """Documents joined as ``BOS doc EOS BOS doc ...`` and cut into full windows of ``seq_len``."""
    stream: list[int] = []
    for text in texts:
        if tokenizer.bos_token_id is not None:
            stream.append(tokenizer.bos_token_id)
        stream += tokenizer(text, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            stream.append(tokenizer.eos_token_id)
    n = len(stream) // seq_len
    if n == 0:
        raise EngineError(f"text data has {len(stream)} tokens, fewer than one window of {seq_len}")
    return [stream[i * seq_len : (i + 1) * seq_len] for i in range(n)]
