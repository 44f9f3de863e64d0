"""The vocabulary-sized tables on disk: input embeddings read a row per token, the output head a tile of rows at a time.

On the disk tier only the decoder block at work is in memory, and at small and
middle sizes the two float ``[vocab, hidden]`` tables are then most of what is
left (two fifths of a 134M-parameter Llama).  Both are frozen, and neither is
needed whole at once:

* the input embeddings are only gathered from: a step of 512 tokens reads at
  most 512 rows;
* the output head is a matmul over its rows, which the trainer's loss
  (``engine.train.losses``) takes a tile at a time through
  :meth:`DiskHead.weight_tiles`, gradients included, in one pass: the head is
  read once a step.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from engine.errors import EngineError
from engine.lora.function import linear
from engine.model import vocab_table_names
from engine.storage import atomic_save_safetensors, safetensors_header

TABLE_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
HEAD_TILE_BYTES = 16 << 20  # rows per read of the head in its own forward (evaluation's full logits)


class DiskTable(nn.Module):
    """A frozen ``[rows, columns]`` float table kept as tensor ``tensor`` of a safetensors file, read by rows (in
    place: a quantized directory's or a checkpoint's own file serves, with no copy)."""

    def __init__(self, path: str | Path, device: torch.device | str = "cpu", tensor: str = "weight") -> None:
        super().__init__()
        self.path, self.device = Path(path), torch.device(device)
        header, data_start = safetensors_header(self.path)
        if tensor not in header:
            raise EngineError(f"{self.path}: no tensor {tensor!r}")
        entry = header[tensor]
        if entry["dtype"] not in TABLE_DTYPES:
            raise EngineError(f"{self.path}: table dtype {entry['dtype']} not one of {', '.join(TABLE_DTYPES)}")
        self.dtype = TABLE_DTYPES[entry["dtype"]]
        self.rows, self.columns = entry["shape"]
        self.row_bytes = self.columns * self.dtype.itemsize
        self.data_start = data_start + entry["data_offsets"][0]

    @classmethod
    def offload(cls, weight: torch.Tensor, path: str | Path, device: torch.device | str = "cpu") -> DiskTable:
        """Write ``weight`` to ``path`` (atomically) and return the module that reads it from there to ``device``."""
        if weight.requires_grad:
            raise EngineError(f"only a frozen table can live on disk ({Path(path).name} trains here)")
        atomic_save_safetensors(path, {"weight": weight.detach().cpu()})
        return cls(path, device)

    def read_rows(self, start: int, out: torch.Tensor, fd: int) -> torch.Tensor:
        """Rows ``start .. start + len(out)`` of the open file ``fd``, read into ``out``."""
        if os.preadv(fd, [out.view(torch.uint8).numpy()], self.data_start + start * self.row_bytes) != out.nbytes:
            raise EngineError(f"{self.path}: truncated table")
        return out

    def extra_repr(self) -> str:
        return f"{self.rows}, {self.columns}, dtype={self.dtype}, path={self.path}"


class DiskEmbedding(DiskTable):
    """A frozen ``nn.Embedding`` on disk; each lookup reads only the rows of the distinct tokens it gets."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.reshape(-1).cpu()
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.rows):
            raise IndexError(f"token id out of range for an embedding table of {self.rows} rows")
        unique, inverse = torch.unique(ids, return_inverse=True)
        rows = torch.empty(len(unique), self.columns, dtype=self.dtype)
        with open(self.path, "rb") as f:
            for i, token in enumerate(unique.tolist()):
                self.read_rows(token, rows[i : i + 1], f.fileno())
        return rows[inverse].view(*input_ids.shape, self.columns).to(self.device)


class DiskHead(DiskTable):
    """A frozen bias-free output ``nn.Linear`` on disk, handed out a tile of rows (vocabulary entries) at a time."""

    @property
    def out_features(self) -> int:
        return self.rows

    def weight_tiles(self, tile_rows: int) -> Iterator[tuple[int, torch.Tensor]]:
        """``(first row, weight[first row : first row + tile_rows])`` over the whole head, each a fresh read from
        disk (the page cache is dropped behind it, as for the streamed blocks)."""
        with open(self.path, "rb") as f:
            for start in range(0, self.rows, tile_rows):
                stop = min(start + tile_rows, self.rows)
                tile = self.read_rows(start, torch.empty(stop - start, self.columns, dtype=self.dtype), f.fileno())
                os.posix_fadvise(f.fileno(), self.data_start + start * self.row_bytes, tile.nbytes,
                                 os.POSIX_FADV_DONTNEED)
                yield start, tile.to(self.device)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        tile_rows = max(1, HEAD_TILE_BYTES // self.row_bytes)
        return torch.cat([linear(hidden, tile) for _, tile in self.weight_tiles(tile_rows)], dim=-1)


def disk_vocab_tables(model: nn.Module) -> dict[str, nn.Module]:
    """The tables the disk tier keeps on disk, by role (:func:`engine.model.vocab_table_names`)."""
    roles = vocab_table_names(model)
    tables = {}
    if "input embeddings" in roles:
        tables["input embeddings"] = model.get_input_embeddings()
    if "output head" in roles:
        tables["output head"] = model.get_output_embeddings()
    return tables


def offload_vocab_tables(model: nn.Module, directory: str | Path, device: torch.device | str = "cpu") -> list[str]:
    """Put ``model``'s frozen :func:`disk_vocab_tables` on disk under ``directory``, read back to ``device``; the
    names of those moved."""
    tables = disk_vocab_tables(model)
    directory = Path(directory)
    if "input embeddings" in tables:
        weight = tables["input embeddings"].weight
        model.set_input_embeddings(DiskEmbedding.offload(weight, directory / "input_embeddings.safetensors", device))
    if "output head" in tables:
        model.set_output_embeddings(DiskHead.offload(tables["output head"].weight,
                                                     directory / "output_head.safetensors", device))
    return list(tables)


def vocab_tables_in_place(model: nn.Module, path: str | Path, device: torch.device | str = "cpu") -> list[str]:
    """Read ``model``'s vocabulary tables (left on ``meta``) from the safetensors file ``path`` that holds them under
    their own names (a quantized directory's ``outside.safetensors``) to ``device``: nothing is copied."""
    roles = vocab_table_names(model)
    if "input embeddings" in roles:
        model.set_input_embeddings(DiskEmbedding(path, device, tensor=roles["input embeddings"]))
    if "output head" in roles:
        model.set_output_embeddings(DiskHead(path, device, tensor=roles["output head"]))
    return list(roles)
