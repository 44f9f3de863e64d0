"""Offload: packed weights streamed from device, host or disk tiers (on disk, the embeddings and head too);
optimizer state on the host."""

from engine.offload.optimizer import HostOffloadedAdam
from engine.offload.shapes import BUILTIN_CONFIGS
from engine.offload.store import TIERS, BlockStore, DeviceStore, DiskStore, HostStore, make_store
from engine.offload.streamer import BlockStreamer
from engine.offload.vocab import DiskEmbedding, DiskHead, offload_vocab_tables

__all__ = [
    "BUILTIN_CONFIGS", "TIERS", "BlockStore", "BlockStreamer", "DeviceStore", "DiskEmbedding", "DiskHead", "DiskStore", "HostOffloadedAdam",
    "HostStore", "make_store", "offload_vocab_tables",
]
