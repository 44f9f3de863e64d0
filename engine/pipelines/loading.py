"""Loading what a use case starts from: a model with the adapter of a corrected directory or a finetune run, and
the offload tier its decoder blocks are streamed from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from engine.export import attach_adapter, is_adapter_dir, read_adapter
from engine.model import is_quantized_dir, load_model, place, read_manifest
from engine.offload import BlockStreamer, make_store, offload_vocab_tables, stream_from_directory
from engine.pipelines.specs import OffloadSpec
from engine.train import ONE_PROCESS, WorkerGroup

ADAPTER_DIR = "adapter"
# Adapters are made (and read) on the host and then placed: the CPU generator gives the same adapter on any machine.
ADAPTER_INIT_DEVICE = "cpu"


def base_of(source: str | Path) -> str:
    """The model the weights come from: a quantized or corrected directory itself, a finetune run's base (its
    adapter names it), else the source (a float model)."""
    adapter = Path(source) / ADAPTER_DIR
    if is_adapter_dir(adapter) and not is_quantized_dir(source):
        return read_adapter(adapter)[0]["base_model_name_or_path"]
    return str(source)


def streams_in_place(source: str | Path, offload: OffloadSpec) -> bool:
    """Whether the disk tier reads the blocks and vocabulary tables from the base's own files (a format 2
    quantized directory, no other block directory asked for) instead of a copy."""
    base = base_of(source)
    return (offload.tier == "disk" and offload.dir is None and is_quantized_dir(base)
            and read_manifest(base).get("format_version") == 2)


def load_with_adapter(
    source: str | Path, stream: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict[str, Any] | None]:
    """A model with the adapter of a corrected directory or of a finetune run, else the model itself; ``stream``
    leaves the blocks' packed weights and the vocabulary tables on disk (see :func:`attach_offload`)."""
    adapter = Path(source) / ADAPTER_DIR
    model, tokenizer, manifest = load_model(base_of(source), stream)
    if is_adapter_dir(adapter):
        attach_adapter(model, adapter, device=ADAPTER_INIT_DEVICE, base_manifest=manifest)
    return model, tokenizer, manifest


def attach_offload(model: PreTrainedModel, source: str | Path, offload: OffloadSpec, blocks_dir: Path,
                   device: torch.device, group: WorkerGroup = ONE_PROCESS) -> BlockStreamer | None:
    """Stream ``model``'s decoder blocks from the tier ``offload`` names (None: resident) to ``device``, and place
    everything else there.  A model loaded with ``stream`` reads its blocks and vocabulary tables from its
    directory in place; otherwise the blocks go to the tier's store (on disk: ``offload.dir`` or ``blocks_dir``,
    the tables beside them; each worker of a ``group`` in a folder of its own).  The blocks leave the model
    before it is placed, so they never all reach the device at once."""
    streamer = None
    if offload.tier is not None and streams_in_place(source, offload):
        streamer = stream_from_directory(model, base_of(source), offload.prefetch, device)
    elif offload.tier is not None:
        directory = Path(offload.dir or blocks_dir)
        store = make_store(offload.tier, device, directory=directory / f"worker-{group.rank}" if group.size > 1
                           else directory)
        streamer = BlockStreamer(model, store, offload.prefetch)
        if offload.tier == "disk":
            offload_vocab_tables(model, store.directory, device)
    place(model, device)
    return streamer


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return candidate
    return 0
