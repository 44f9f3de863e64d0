"""Plain text files as token ids: the whole-file windows of the perplexity protocol and the
seeded random windows calibration and error correction learn from."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from engine.errors import EngineError


def read_text(path: str | Path) -> str:
    return _prefix(Path(path), -1)[0]


CHARS_PER_TOKEN = 16  # characters read per token needed, at first (doubled until enough; English text: ~4)
PREFIX_MARGIN = 64  # tokens a prefix must hold beyond those used: its cut (at a line break) never reaches them


def _prefix(path: Path, chars: int) -> tuple[str, bool]:
    """The first ``chars`` characters (-1: all) of a text file cut after its last line break, and whether that
    is all of it."""
    if not path.is_file():
        raise EngineError(f"{path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(chars)
            whole = f.read(1) == ""
    except UnicodeDecodeError as exc:
        raise EngineError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not whole and "\n" in text:
        text = text[: text.rindex("\n") + 1]
    return text, whole


def text_for(tokenizer: PreTrainedTokenizerBase, path: str | Path, tokens: int | None) -> str:
    """The text of a file, or, with ``tokens``, the shortest prefix (ending at a line break, its length doubled
    until it is enough) whose tokens begin with the file's first ``tokens``: a ``--limit`` reads and tokenizes
    what it uses, whatever the file's size."""
    if tokens is None:
        return read_text(path)
    chars = max(tokens, 1) * CHARS_PER_TOKEN
    while True:
        text, whole = _prefix(Path(path), chars)
        if whole or len(tokenizer(text, add_special_tokens=False)["input_ids"]) > tokens + PREFIX_MARGIN:
            return text
        chars *= 2


def token_windows(tokenizer: PreTrainedTokenizerBase, text: str, seq_len: int) -> torch.Tensor:
    """``[n_windows, seq_len]`` token ids of ``text`` (BOS first)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id, *ids]
    n = len(ids) // seq_len
    if n == 0:
        raise EngineError(f"text has {len(ids)} tokens, fewer than one window of {seq_len}")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def calibration_windows(
    tokenizer: PreTrainedTokenizerBase, text: str, n_windows: int, seq_len: int, seed: int
) -> torch.Tensor:
    """``[n_windows, seq_len]`` token ids: windows of the tokenized ``text`` at seeded random offsets."""
    return draw_windows(text_ids(tokenizer, text), n_windows, seq_len, seed)


def text_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> torch.Tensor:
    """The token ids of ``text``, no special tokens: what several draws of windows share."""
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def draw_windows(ids: torch.Tensor, n_windows: int, seq_len: int, seed: int) -> torch.Tensor:
    """``[n_windows, seq_len]`` windows of the calibration text's ``ids`` at seeded random offsets."""
    if n_windows < 1 or seq_len < 2:
        raise EngineError(f"need at least 1 calibration window of at least 2 tokens, got {n_windows} x {seq_len}")
    if len(ids) < seq_len:
        raise EngineError(f"calibration text has {len(ids)} tokens, fewer than one window of {seq_len}")
    if n_windows > len(ids) // seq_len:
        raise EngineError(f"calibration text has {len(ids)} tokens: room for {len(ids) // seq_len} windows of "
                          f"{seq_len}, fewer than the {n_windows} asked for (ask for fewer, or give a longer text)")
    starts = torch.randint(0, len(ids) - seq_len + 1, (n_windows,), generator=torch.Generator().manual_seed(seed))
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])
