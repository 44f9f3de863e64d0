"""Offload: packed weights streamed from device, host or disk tiers; optimizer state on the host."""

from engine.offload.optimizer import HostOffloadedAdam
from engine.offload.store import TIERS, BlockStore, DeviceStore, DiskStore, HostStore, make_store
from engine.offload.streamer import BlockStreamer

__all__ = ["TIERS", "BlockStore", "BlockStreamer", "DeviceStore", "DiskStore", "HostOffloadedAdam", "HostStore", "make_store"]
