"""A finetuned model back to llama.cpp: the merged model as one GGUF file of a chosen type (``llama-cli -m``), and
the adapter as a GGUF LoRA (``--lora``) for the GGUF it was trained on.

Both are shaped by the GGUF file the model came from (the base itself, or the source a quantized directory was
made from): its metadata, tokenizer and tensor names are copied, its tensors outside the decoder linears (which
LoRA does not train) copied byte for byte.  Each decoder linear is the engine's merged weight ``W_q + s B A``
(computed in float64, one block in memory at a time) in llama.cpp's row order (Llama's Q and K rows permuted for
its rotary layout).  The LoRA file holds ``A`` as ``lora_a`` and ``B`` as ``lora_b`` with ``adapter.lora.alpha``,
so llama.cpp's scale ``alpha / rank`` is the engine's (an adapter cut to a lower rank keeps its trained scale).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGUFReader, GGUFWriter, Keys
from transformers import PreTrainedModel

from engine.errors import EngineError
from engine.lora.linear import ModuLoRALinear
from engine.model import BlockLifecycle, blocks_prefix, decoder_blocks, gguf_linears, meta_model, place, write_like
from engine.storage import staged_dir

MODEL_FILE = "model.gguf"
LORA_FILE = "lora.gguf"
GGUF_MANIFEST = "modulora_gguf.json"  # sha256 of the files, sealed


def gguf_template(base: str, manifest: dict[str, Any] | None) -> Path:
    """The GGUF file whose metadata and tokenizer the export copies: the base, or the file it was quantized from."""
    source = (manifest or {}).get("source_model", base)
    for candidate in (Path(base), Path(source)):
        if candidate.suffix == ".gguf" and candidate.is_file():
            return candidate
    raise EngineError(f"--gguf copies the metadata and tokenizer of the GGUF file a model came from; {base} came "
                      f"from {source}, not a GGUF file (write --merged and convert it with llama.cpp's "
                      "convert_hf_to_gguf.py)")


def save_gguf(
    model: PreTrainedModel, template: Path, out_dir: str | Path, qtype: str, rank: int,
    blocks: BlockLifecycle | None = None, device: torch.device | str = "cpu",
) -> dict[str, str]:
    """``OUT/model.gguf`` (merged, decoder linears in ``qtype``) and ``OUT/lora.gguf`` (the adapter cut to ``rank``),
    atomically, with a sealed checksum manifest; returns ``{tensor: type}`` of the merged decoder linears."""
    linears = gguf_linears(GGUFReader(template), meta_model(model.config))
    layers = {name: m for name, m in model.named_modules() if isinstance(m, ModuLoRALinear)}
    unmatched = sorted(set(layers) - {name for name, _ in linears.values()})
    if unmatched:
        raise EngineError(f"{template}: no tensor for the adapted layer(s) {unmatched[:3]}; is it the model's source?")
    with staged_dir(out_dir, GGUF_MANIFEST) as staging:
        chosen = write_like(template, staging / MODEL_FILE, linears, _MergedRows(model, linears, blocks, device),
                            qtype)
        _write_lora(template, staging / LORA_FILE, linears, layers, rank)
    return chosen


class _MergedRows:
    """A decoder linear's merged weight in the file's row order, each block brought in before its first linear and
    released after its last (the file lists tensors block by block)."""

    def __init__(self, model: PreTrainedModel, linears: dict[str, tuple[str, np.ndarray]],
                 blocks: BlockLifecycle | None, device: torch.device | str) -> None:
        self.model, self.linears, self.device = model, linears, device
        self.blocks = blocks or BlockLifecycle()
        self.prefix = f"{blocks_prefix(model)}."
        self.total = Counter(self._block(name) for name, _ in linears.values())
        self.left = dict(self.total)  # block -> its linears not yet written

    def _block(self, module: str) -> int:
        return int(module.removeprefix(self.prefix).split(".", 1)[0])

    @torch.no_grad()
    def __call__(self, gguf_name: str) -> np.ndarray:
        module, order = self.linears[gguf_name]
        index = self._block(module)
        if self.left[index] == self.total[index]:
            self.blocks.load(index)
            place(decoder_blocks(self.model)[index], self.device)
        weight = self.model.get_submodule(module).merged_weight(torch.float64).to("cpu", torch.float32).numpy()
        self.left[index] -= 1
        if self.left[index] == 0:
            self.blocks.done(index)
        return _in_file_order(weight, order)


def _in_file_order(matrix: np.ndarray, order: np.ndarray) -> np.ndarray:
    """A model-side ``[out, ...]`` matrix with its rows where the file keeps them: the model's row i is the file's
    row ``order[i]``."""
    rows = np.empty_like(matrix)
    rows[order] = matrix
    return rows


def _write_lora(template: Path, path: Path, linears: dict[str, tuple[str, np.ndarray]],
                layers: dict[str, ModuLoRALinear], rank: int) -> None:
    """llama.cpp's LoRA adapter file: ``NAME.lora_a`` ``[rank, in]`` and ``NAME.lora_b`` ``[out, rank]`` (rows in the
    file's order) per adapted file tensor ``NAME``, in float32."""
    alphas = {layer.alpha * rank / layer.rank for layer in layers.values()}  # llama.cpp's alpha / rank: the trained scale
    if len(alphas) != 1:
        raise EngineError(f"layers have different LoRA alphas {sorted(alphas)}; a GGUF LoRA holds one")
    writer = GGUFWriter(path, GGUFReader(template).fields[Keys.General.ARCHITECTURE].contents())
    writer.add_type("adapter")
    writer.add_string(Keys.Adapter.TYPE, "lora")
    writer.add_float32(Keys.Adapter.LORA_ALPHA, float(alphas.pop()))
    for gguf_name, (module, order) in linears.items():
        layer = layers.get(module)
        if layer is None:
            continue
        a = layer.lora_a.detach()[:rank].to("cpu", torch.float32).numpy()
        b = layer.lora_b.detach()[:, :rank].to("cpu", torch.float32).numpy()
        stem = gguf_name.removesuffix(".weight")
        writer.add_tensor(f"{stem}.weight.lora_a", np.ascontiguousarray(a))
        writer.add_tensor(f"{stem}.weight.lora_b", _in_file_order(b, order))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
