"""Float checkpoints read one tensor at a time: Hugging Face safetensors (one file, or shards with an index) and GGUF.

A model larger than memory is never read whole: the model is built on ``meta``
(:mod:`engine.model.build`) and each tensor is read from its source only when
the part of the model that holds it is materialised (one decoder block, or the
embeddings, norms and head).  Tensors come back in the checkpoint's own dtype
(bfloat16 stays bfloat16); safetensors shards are read tensor by tensor with
plain reads, never memory-mapped (a mapped shard's touched pages would stay in
the process's RSS), so a tensor costs its own bytes, nothing more.
"""

from __future__ import annotations

import json
import re
import struct
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from engine.errors import EngineError
from engine.hub import hub_snapshot, is_hub_id
from engine.storage import read_tensors, safetensors_header

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointSource(ABC):
    """A float checkpoint: its config, its tokenizer and its tensors by parameter name."""

    def __init__(self, path: Path, config: PretrainedConfig) -> None:
        self.path, self.config = path, config

    @abstractmethod
    def names(self) -> list[str]:
        """Parameter names the checkpoint holds (a tied output head may be absent)."""

    @abstractmethod
    def read(self, name: str) -> torch.Tensor:
        """One tensor, in the checkpoint's dtype, on the CPU."""

    @abstractmethod
    def tokenizer(self) -> PreTrainedTokenizerBase: ...

    def missing(self, name: str) -> EngineError:
        """The one-line error for a tensor the model needs and the checkpoint does not hold."""
        return EngineError(f"{self.path}: the checkpoint has no tensor {name!r}")

    def __contains__(self, name: str) -> bool:
        return name in self._name_set

    @property
    def _name_set(self) -> set[str]:
        if not hasattr(self, "_names_cache"):
            self._names_cache = set(self.names())
        return self._names_cache


class SafetensorsSource(CheckpointSource):
    """A Hugging Face model directory: ``config.json``, ``model.safetensors`` or sharded files with an index."""

    def __init__(self, directory: Path) -> None:
        if not (directory / "config.json").is_file():
            raise EngineError(f"{directory}: not a model directory (no config.json)")
        super().__init__(directory, AutoConfig.from_pretrained(str(directory)))
        if (directory / INDEX_FILE).is_file():
            try:
                weight_map = json.loads((directory / INDEX_FILE).read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise EngineError(f"{directory / INDEX_FILE}: not a safetensors index ({exc})") from None
        elif (directory / SINGLE_FILE).is_file():
            weight_map = {name: SINGLE_FILE for name in self._keys(directory / SINGLE_FILE)}
        else:
            raise EngineError(f"{directory}: no {SINGLE_FILE} nor {INDEX_FILE} (only safetensors checkpoints are read)")
        renames, self.converted = _renamings(self.config)
        self.stored = {_renamed(key, renames): key for key in weight_map}  # model name -> name in the checkpoint
        self.weight_map: dict[str, str] = {name: weight_map[key] for name, key in self.stored.items()}
        self._headers: dict[str, tuple[dict[str, Any], int]] = {}

    @staticmethod
    def _keys(path: Path) -> list[str]:
        return list(_header(path)[0])

    def names(self) -> list[str]:
        return list(self.weight_map)

    def file_of(self, name: str) -> Path:
        """The shard that holds ``name`` (a safetensors file: tables on disk read it in place)."""
        return self.path / self.weight_map[name]

    def read(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise self.missing(name)
        path = self.path / self.weight_map[name]
        if path.name not in self._headers:
            self._headers[path.name] = _header(path)
        key = self.stored[name]
        try:
            return read_tensors(path, [key], self._headers[path.name])[key]
        except OSError as exc:
            raise EngineError(f"{path}: unreadable ({exc})") from None

    def tokenizer(self) -> PreTrainedTokenizerBase:
        return AutoTokenizer.from_pretrained(str(self.path))

    def missing(self, name: str) -> EngineError:
        if not self.converted:
            return super().missing(name)
        return EngineError(f"{self.path}: the checkpoint has no tensor {name!r} (transformers builds "
                           f"{', '.join(self.converted)} from several stored tensors when it loads this model; the "
                           "engine does not read such checkpoints yet)")


def _conversions(config: PretrainedConfig) -> list[Any]:
    """transformers' checkpoint conversions for this model (renamings, and the stacking of per-expert tensors)."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    found = None
    for key in [*(getattr(config, "architectures", None) or []), config.model_type]:
        found = found or get_checkpoint_conversion_mapping(key)
    return list(found or [])


def expert_projection_names(config: PretrainedConfig) -> tuple[str, str, str] | None:
    """The per-expert tensor names (gate, up, down) a checkpoint of this model stores its experts under, where
    transformers stacks them into ``experts.gate_up_proj`` and ``experts.down_proj`` (Mixtral: ``w1``, ``w3``,
    ``w2``); None for a model without such experts."""
    stacked: dict[str, list[str]] = {}
    for transform in _conversions(config):
        targets = transform.target_patterns
        if type(transform).__name__ == "WeightConverter" and len(targets) == 1:
            stacked[targets[0].rsplit(".", 1)[-1]] = [_expert_name(p) for p in transform.source_patterns]
    gate_up, down = stacked.get("gate_up_proj", []), stacked.get("down_proj", [])
    if len(gate_up) != 2 or len(down) != 1 or None in (*gate_up, *down):
        return None
    return gate_up[0], gate_up[1], down[0]


def _expert_name(pattern: str) -> str | None:
    """``w1`` from ``.experts.*.w1.weight``; None for any other pattern."""
    found = re.fullmatch(r".*experts\.\*\.(\w+)\.weight", pattern)
    return found.group(1) if found else None


def _renamings(config: PretrainedConfig) -> tuple[list[tuple[re.Pattern[str], str]], list[str]]:
    """transformers' checkpoint key renamings for this model (GPT-NeoX's ``embed_out`` is the model's ``lm_head``),
    and the targets of the conversions that are more than a renaming and that the engine does not build as stored
    (stacked experts are built one linear layer per expert: :mod:`engine.model.experts`)."""
    split = expert_projection_names(config) is not None
    renames, converted = [], []
    for transform in _conversions(config):
        simple = type(transform).__name__ == "WeightRenaming" and len(transform.source_patterns) == 1
        if simple:
            renames.append((re.compile(transform.source_patterns[0]), transform.target_patterns[0]))
        elif not (split and transform.target_patterns[0].endswith(("experts.gate_up_proj", "experts.down_proj"))):
            converted += transform.target_patterns
    return renames, converted


def _renamed(key: str, renames: list[tuple[re.Pattern[str], str]]) -> str:
    for pattern, target in renames:
        key = pattern.sub(target, key)
    return key


class GGUFSource(CheckpointSource):
    """A GGUF file: tensors dequantized to float32 one at a time, renamed and re-ordered as transformers' GGUF
    loader does (its name map and tensor processor, e.g. Llama's rotary row order of Q and K)."""

    def __init__(self, path: Path) -> None:
        from gguf import GGUFReader
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

        from engine.model.build import meta_model
        from engine.model.loading import gguf_config_and_tokenizer

        config, self._tokenizer = gguf_config_and_tokenizer(path)
        super().__init__(path, config)
        try:
            self.reader = GGUFReader(path)
        except (ValueError, OSError) as exc:
            raise EngineError(f"{path}: not a readable GGUF file ({exc})") from None
        architecture = self.reader.fields["general.architecture"].contents()
        self.processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=config.to_dict())
        self.mapping = get_gguf_hf_weights_map(meta_model(config), self.processor)
        self.tensors = {self.mapping[t.name]: t for t in self.reader.tensors if t.name in self.mapping}

    def names(self) -> list[str]:
        return list(self.tensors)

    def read(self, name: str) -> torch.Tensor:
        from gguf.quants import dequantize

        if name not in self.tensors:
            raise EngineError(f"{self.path}: the file has no tensor for {name!r}")
        tensor = self.tensors[name]
        result = self.processor.process(weights=dequantize(tensor.data, tensor.tensor_type), name=tensor.name,
                                        tensor_key_mapping=self.mapping, parsed_parameters={"tensors": {}})
        return torch.from_numpy(np.array(result.weights, dtype=np.float32))

    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self._tokenizer


def _header(path: Path) -> tuple[dict[str, Any], int]:
    try:
        return safetensors_header(path)
    except (OSError, ValueError, struct.error) as exc:
        raise EngineError(f"{path}: not a readable safetensors file ({exc})") from None


def open_source(source: str | Path) -> CheckpointSource:
    """A float checkpoint: a ``.gguf`` file, a local Hugging Face directory, or a hub id (downloaded to the local
    cache first; with ``HF_HUB_OFFLINE=1`` or no network, one line naming the id)."""
    path = Path(source)
    if path.is_file() and path.suffix == ".gguf":
        return GGUFSource(path)
    if path.is_dir():
        return SafetensorsSource(path)
    if path.exists():
        raise EngineError(f"{path}: expected a .gguf file or a model directory")
    if not is_hub_id(str(source)):
        raise EngineError(f"{source}: no such file or directory")
    return SafetensorsSource(hub_snapshot(str(source)))
