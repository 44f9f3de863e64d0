"""Offload: packed weights streamed from device, host or disk tiers (on disk, the embeddings and head too);
optimizer state on the host."""

from engine.offload.directory import stream_checkpoint, stream_from_directory
from engine.offload.optimizer import HostOffloadedAdam
from engine.offload.shapes import BUILTIN_CONFIGS
from engine.offload.store import TIERS, BlockStore, CheckpointStore, DeviceStore, DiskStore, HostStore, make_store
from engine.offload.streamer import BlockStreamer, float_weights, packed_weights
from engine.offload.vocab import DiskEmbedding, DiskHead, offload_vocab_tables

__all__ = [
    "BUILTIN_CONFIGS", "TIERS", "BlockStore", "CheckpointStore", "BlockStreamer", "DeviceStore", "DiskEmbedding", "DiskHead", "DiskStore", "HostOffloadedAdam",
    "HostStore", "float_weights", "make_store", "offload_vocab_tables", "packed_weights", "stream_checkpoint", "stream_from_directory",
]
