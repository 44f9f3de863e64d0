"""Local data files -> tokenized, loss-masked examples in the text, alpaca, classification,
summarization and chat formats; text files as token windows."""

from engine.data.dataset import Example, build_examples, check_data, collate
from engine.data.formats import FORMATS, IGNORE, FormatSpec
from engine.data.records import load_records, require_columns
from engine.data.text import calibration_windows, draw_windows, read_text, text_for, text_ids, token_windows

__all__ = [
    "FORMATS", "IGNORE", "Example", "FormatSpec", "build_examples", "calibration_windows", "check_data", "collate",
    "draw_windows", "load_records", "read_text", "require_columns", "text_for", "text_ids", "token_windows",
]
