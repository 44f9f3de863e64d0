"""Load a float causal LM and its tokenizer from a local HF directory, a GGUF file or a hub id."""

from __future__ import annotations

import logging
import struct
from pathlib import Path

import torch
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from engine.errors import EngineError

log = logging.getLogger(__name__)


def _drop_invalid_token_ids(fields: dict, vocab_size: int) -> None:
    """GGUF writers store "no pad token" as 2**32 - 1; transformers rejects any id outside the vocabulary."""
    for key in [k for k, v in fields.items() if k.endswith("_token_id") and isinstance(v, int)]:
        if not 0 <= fields[key] < vocab_size:
            log.info("dropping %s=%s (outside vocabulary of %d)", key, fields[key], vocab_size)
            del fields[key]


def _gguf_tokenizer(architecture: str, tokenizer_fields: dict) -> PreTrainedTokenizerBase:
    from transformers import PreTrainedTokenizerFast

    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer
    except ImportError:  # transformers before the GGUF integration became a package
        from transformers.integrations.ggml import convert_gguf_tokenizer

    backend, extra = convert_gguf_tokenizer(architecture, tokenizer_fields)
    tokens = tokenizer_fields["tokens"]
    special = {
        name: tokens[tokenizer_fields[f"{name}_id"]]
        for name in ("bos_token", "eos_token", "unk_token", "pad_token")
        if f"{name}_id" in tokenizer_fields
    }
    # merged, not both spread: older transformers (5.17) repeat some special tokens in ``extra``
    return PreTrainedTokenizerFast(tokenizer_object=backend, **{**special, **extra})


def gguf_config_and_tokenizer(path: Path) -> tuple[PretrainedConfig, PreTrainedTokenizerBase]:
    """A GGUF file's config and tokenizer (metadata only), with invalid special-token ids treated as absent."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    try:
        parsed = load_gguf_checkpoint(str(path), return_tensors=False)
    except (ValueError, KeyError, IndexError, struct.error, UnicodeDecodeError) as exc:
        raise EngineError(f"{path}: not a readable GGUF file ({exc})") from None
    fields = dict(parsed["config"])
    vocab_size = fields.get("vocab_size") or len(parsed["tokenizer"]["tokens"])
    _drop_invalid_token_ids(fields, vocab_size)
    _drop_invalid_token_ids(parsed["tokenizer"], vocab_size)
    model_type = fields.pop("model_type")
    fields.pop("_model_name_or_path", None)
    config = AutoConfig.for_model(model_type, **fields)
    return config, _gguf_tokenizer(model_type, parsed["tokenizer"])


def load_float_model(
    source: str | Path, dtype: torch.dtype | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The whole float model and its tokenizer from a ``.gguf`` file, a local Hugging Face directory or a hub id,
    read tensor by tensor into a model built on ``meta``; ``dtype`` None keeps the checkpoint's dtype."""
    from engine.model.build import load_resident
    from engine.model.source import open_source

    checkpoint = open_source(source)
    return load_resident(checkpoint, dtype), checkpoint.tokenizer()
