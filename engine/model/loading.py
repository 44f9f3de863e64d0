"""Load a float causal LM and its tokenizer from a local HF directory, a GGUF file or a hub id."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

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
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    backend, extra = convert_gguf_tokenizer(architecture, tokenizer_fields)
    tokens = tokenizer_fields["tokens"]
    special = {
        name: tokens[tokenizer_fields[f"{name}_id"]]
        for name in ("bos_token", "eos_token", "unk_token", "pad_token")
        if f"{name}_id" in tokenizer_fields
    }
    return PreTrainedTokenizerFast(tokenizer_object=backend, **special, **extra)


def gguf_config_and_tokenizer(path: Path) -> tuple[PretrainedConfig, PreTrainedTokenizerBase]:
    """A GGUF file's config and tokenizer (metadata only), with invalid special-token ids treated as absent."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    parsed = load_gguf_checkpoint(str(path), return_tensors=False)
    fields = dict(parsed["config"])
    vocab_size = fields.get("vocab_size") or len(parsed["tokenizer"]["tokens"])
    _drop_invalid_token_ids(fields, vocab_size)
    _drop_invalid_token_ids(parsed["tokenizer"], vocab_size)
    model_type = fields.pop("model_type")
    fields.pop("_model_name_or_path", None)
    config = AutoConfig.for_model(model_type, **fields)
    return config, _gguf_tokenizer(model_type, parsed["tokenizer"])


def load_gguf(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A GGUF file through transformers' GGUF reader (quantized tensors come back dequantized)."""
    config, tokenizer = gguf_config_and_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, config=config, dtype=dtype)
    # The weights arrive dequantized; drop transformers' "gguf-quantized" marks so the model saves as plain float.
    model.hf_quantizer = None
    model.quantization_method = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def load_float_model(source: str | Path, dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model and tokenizer from a ``.gguf`` file, a local HF directory, or (for real users) a hub id."""
    path = Path(source)
    if path.is_file() and path.suffix == ".gguf":
        model, tokenizer = load_gguf(path, dtype)
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise EngineError(f"{path}: not a model directory (no config.json)")
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    elif path.exists():
        raise EngineError(f"{path}: expected a .gguf file or a model directory")
    elif str(source).startswith((".", "/", "~")) or str(source).count("/") != 1:
        raise EngineError(f"{source}: no such file or directory")
    else:
        model = AutoModelForCausalLM.from_pretrained(str(source), dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(source))
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer
