"""The disk tier over files that already hold the model: a quantized directory's block files and outside file, or a
float checkpoint's own shards.  Nothing is copied: blocks are read from those files when they compute, and the
vocabulary tables are read from them in place."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel

from engine.model import (
    BLOCKS, OUTSIDE, CheckpointSource, SafetensorsSource, blocks_prefix, decoder_blocks, load_outside_blocks,
    meta_model, place, vocab_table_names,
)
from engine.offload.store import CheckpointStore, DiskStore
from engine.offload.streamer import BlockStreamer, float_weights
from engine.offload.vocab import DiskEmbedding, DiskHead, vocab_tables_in_place


def stream_from_directory(model: nn.Module, directory: str | Path, prefetch: int,
                          device: torch.device | str = "cpu") -> BlockStreamer:
    """Stream ``model`` (loaded with ``load_quantized(directory, stream=True)``) from ``directory``'s own files to
    ``device``."""
    directory = Path(directory)
    streamer = BlockStreamer(model, DiskStore(directory / BLOCKS, device), prefetch)
    vocab_tables_in_place(model, directory / OUTSIDE, device)
    return streamer


def stream_checkpoint(source: CheckpointSource, prefetch: int,
                      device: torch.device | str = "cpu") -> tuple[PreTrainedModel, BlockStreamer]:
    """A float model on ``device`` whose decoder blocks are read from ``source`` each time they compute (a teacher
    for LREC): one block's float weights in memory, plus ``prefetch`` more; a safetensors checkpoint's vocabulary
    tables are read in place too."""
    model = meta_model(source.config)
    tables = vocab_table_names(model) if isinstance(source, SafetensorsSource) else {}
    for role, name in tables.items():
        table = (DiskEmbedding if role == "input embeddings" else DiskHead)(source.file_of(name), device, tensor=name)
        (model.set_input_embeddings if role == "input embeddings" else model.set_output_embeddings)(table)
    load_outside_blocks(model, source)
    store = CheckpointStore(source, blocks_prefix(model), len(decoder_blocks(model)), device)
    streamer = BlockStreamer(model, store, prefetch, streamed=float_weights)
    place(model, device)
    return model, streamer
