"""Local data files -> tokenized, loss-masked examples in the text, alpaca, classification,
summarization and chat formats."""

from engine.data.dataset import Example, build_examples, check_data, collate
from engine.data.formats import FORMATS, IGNORE, FormatSpec
from engine.data.records import load_records, require_columns

__all__ = ["FORMATS", "IGNORE", "Example", "FormatSpec", "build_examples", "check_data", "collate", "load_records", "require_columns"]
