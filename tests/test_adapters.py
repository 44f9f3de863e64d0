"""Third-party quantizers (bitsandbytes NF4/FP4, HQQ) and GGUF block formats on the real model.

References are the libraries themselves, run independently of the adapters:
``bitsandbytes.functional``, ``hqq.core.quantize`` with its own bit packing,
gguf-py's numpy ``gguf.quants.dequantize``, transformers' float GGUF loader, plus
the NF4 code table printed in the QLoRA paper (Dettmers et al., 2023, appendix E).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from conftest import GGUF_MODEL
from engine.errors import EngineError
from engine.eval import perplexity
from engine.model import (
    is_quantized_gguf,
    load_float_model,
    load_model,
    load_quantized,
    quantize_gguf,
    quantize_model,
    save_quantized,
)
from engine.quant import BnB4BitWeight, GGUFWeight, HQQWeight, make_quantizer, weight_from_state
from engine.quant.packing import packed_length

# NF4 code points, QLoRA paper appendix E.
NF4_TABLE = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ]
)  # fmt: skip
N_WINDOWS = 64  # perplexity subset: the first 64 validation windows
TILES = [(0, 1), (3, 9), (17, 64)]


@pytest.fixture(scope="module")
def layer_weights(float_model):
    """Real weights: a 64x64 attention projection and the 64x172 FFN down projection."""
    model = float_model[0]
    return {
        "q_proj": model.model.layers[0].self_attn.q_proj.weight.detach().clone(),
        "down_proj": model.model.layers[2].mlp.down_proj.weight.detach().clone(),
    }


def _round_trip(qweight):
    """Rebuild through the same path a saved model takes: ``state_dict`` + manifest."""
    state = {k: v.clone() for k, v in qweight.state_dict().items()}
    return weight_from_state(state, qweight.manifest())


def _assert_tiles(qweight, dense: torch.Tensor) -> None:
    """Row tiles, column tiles (the forward pass's) and both, against slices of the whole weight."""
    n_out, n_in = dense.shape
    spans = [(r, None) for r in TILES] + [(None, (0, 7)), (None, (33, n_in))] + [(r, (5, n_in - 3)) for r in TILES]
    for rows, cols in spans:
        r0, r1 = rows or (0, n_out)
        c0, c1 = cols or (0, n_in)
        tile = qweight.dequantize(torch.float16, rows=rows, cols=cols)
        assert torch.equal(tile, dense[r0:r1, c0:c1].half()), (rows, cols)


def _assert_reloads_identically(model, tokenizer, out_dir, info: dict) -> dict:
    """save_quantized + load_quantized give the same logits; returns the saved manifest."""
    saved = save_quantized(model, tokenizer, out_dir, info)
    reloaded, _, manifest = load_quantized(out_dir)
    assert manifest["quantizer"] == info["quantizer"]
    windows = torch.arange(2 * 64).view(2, 64) % 512
    with torch.no_grad():
        assert torch.equal(model(input_ids=windows).logits, reloaded(input_ids=windows).logits)
    return saved


def _quantized_ppl(float_model, valid_windows, method: str, **options) -> tuple[float, float]:
    """(quantized, float) perplexity on the first validation windows."""
    model = copy.deepcopy(float_model[0])
    quantize_model(model, make_quantizer(method, **options))
    windows = valid_windows[:N_WINDOWS]
    return perplexity(model, windows, progress=False).ppl, perplexity(float_model[0], windows, progress=False).ppl


# ---------------------------------------------------------------------------------------------
# bitsandbytes NF4 / FP4


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("layer", ["q_proj", "down_proj"])
def test_bnb_equals_library_dequantize(layer_weights, quant_type, double_quant, layer):
    import bitsandbytes.functional as F

    w = layer_weights[layer]
    qweight = make_quantizer(quant_type, bits=4, group_size=64, double_quant=double_quant).quantize(w)
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=double_quant)
    reference = F.dequantize_4bit(packed, state)
    assert isinstance(qweight, BnB4BitWeight)
    assert torch.equal(qweight.packed, packed.reshape(-1))
    assert torch.equal(qweight.dequantize(), reference)
    _assert_tiles(qweight, reference)
    rebuilt = _round_trip(qweight)
    assert rebuilt.config() == qweight.config()
    assert torch.equal(rebuilt.dequantize(), reference)

    n = w.numel()
    n_blocks = math.ceil(n / 64)
    absmax_bytes = n_blocks + 4 * math.ceil(n_blocks / 256) + 4 if double_quant else 4 * n_blocks
    assert qweight.nbytes == math.ceil(n / 2) + absmax_bytes
    assert qweight.bits_per_weight == 8 * qweight.nbytes / n


def test_nf4_codes_are_nearest_points_of_the_qlora_table(layer_weights):
    """Decode the stored nibbles with the paper's table: equals dequantize, and every code is the nearest point."""
    w = layer_weights["down_proj"]  # 172 wide: blocks of 64 straddle rows
    qweight = make_quantizer("nf4", group_size=64).quantize(w)
    nibbles = torch.stack([qweight.packed >> 4, qweight.packed & 0x0F], dim=1).reshape(-1)[: w.numel()].long()
    absmax = qweight.absmax.repeat_interleave(64)[: w.numel()]
    assert torch.equal(qweight.dequantize().reshape(-1), NF4_TABLE[nibbles] * absmax)
    normalized = (w.reshape(-1) / absmax).unsqueeze(1)
    distance = (normalized - NF4_TABLE).abs()
    chosen = distance.gather(1, nibbles.unsqueeze(1)).squeeze(1)
    assert torch.all(chosen <= distance.min(dim=1).values + 1e-6)


def test_bnb_rejects_bad_settings():
    with pytest.raises(EngineError, match="bits: expected one of 4, got 3"):
        make_quantizer("nf4", bits=3)
    with pytest.raises(EngineError, match="group_size: expected one of 32, 64, 128"):
        make_quantizer("fp4", group_size=48)


def test_nf4_perplexity_near_float(float_model, valid_windows):
    ppl, float_ppl = _quantized_ppl(float_model, valid_windows, "nf4", bits=4, group_size=64)
    assert float_ppl < ppl < 1.2 * float_ppl, (ppl, float_ppl)


# ---------------------------------------------------------------------------------------------
# HQQ


def _hqq_reference(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """HQQ end to end with its own bit packing, scale/zero kept in float16 as HQQLinear keeps them."""
    from hqq.core.quantize import Quantizer as HQQ
    from hqq.core.quantize import hqq_base_quant_config

    params = hqq_base_quant_config(nbits=bits, group_size=group_size, axis=1)["weight_quant_params"]
    packed, meta = HQQ.quantize(w, device="cpu", compute_dtype=torch.float32, **params)
    meta = {**meta, "compute_dtype": torch.float32}
    meta["scale"] = meta["scale"].half().float()
    meta["zero"] = meta["zero"].half().float()
    return HQQ.dequantize(packed, meta)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("layer", ["q_proj", "down_proj"])
def test_hqq_equals_library_dequantize(layer_weights, bits, layer):
    w = layer_weights[layer]
    qweight = make_quantizer("hqq", bits=bits, group_size=64).quantize(w)
    reference = _hqq_reference(w, bits, 64)
    assert isinstance(qweight, HQQWeight)
    assert torch.equal(qweight.dequantize(), reference)
    _assert_tiles(qweight, reference)
    rebuilt = _round_trip(qweight)
    assert rebuilt.config() == qweight.config()
    assert torch.equal(rebuilt.dequantize(), reference)

    n_groups = w.numel() // 64
    assert qweight.nbytes == n_groups * packed_length(64, bits) + 2 * 2 * n_groups
    assert qweight.bits_per_weight == bits + 32 / 64


def test_hqq_rejects_bad_settings(layer_weights):
    with pytest.raises(EngineError, match="bits"):
        make_quantizer("hqq", bits=5)
    with pytest.raises(EngineError, match="multiple of 8"):
        make_quantizer("hqq", group_size=12)
    with pytest.raises(EngineError, match="symmetric: method 'hqq' does not take it"):
        make_quantizer("hqq", symmetric=True)
    with pytest.raises(EngineError, match="group size 48"):
        make_quantizer("hqq", group_size=48).quantize(layer_weights["down_proj"][:5])


def test_hqq_4bit_perplexity_near_float(float_model, valid_windows):
    ppl, float_ppl = _quantized_ppl(float_model, valid_windows, "hqq", bits=4, group_size=64)
    assert float_ppl < ppl < 1.15 * float_ppl, (ppl, float_ppl)


@pytest.mark.parametrize(
    ("method", "options"),
    [("nf4", {"double_quant": True}), ("fp4", {"group_size": 128}), ("hqq", {"bits": 3, "group_size": 32})],
)
def test_adapter_models_save_and_reload_identically(float_model, tmp_path, method, options):
    model = copy.deepcopy(float_model[0])
    quantizer = make_quantizer(method, **options)
    quantize_model(model, quantizer)
    _assert_reloads_identically(model, float_model[1], tmp_path / method, {"quantizer": quantizer.describe()})


# ---------------------------------------------------------------------------------------------
# GGUF block formats

# Byte offsets of each type's float16 scale fields (random bytes there could be NaN or inf).
F16_FIELDS = {
    "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0],
    "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208],
    # the lookup-grid types (decoded by gguf-py on the host): IQ1_M and MXFP4 keep their scales in other fields
    "IQ4_NL": [0], "IQ4_XS": [0], "IQ3_S": [0], "IQ3_XXS": [0], "IQ2_S": [0], "IQ2_XS": [0], "IQ2_XXS": [0],
    "IQ1_S": [0], "IQ1_M": [], "TQ2_0": [64], "TQ1_0": [52], "MXFP4": [],
}  # fmt: skip
GGUF_PY_CAN_QUANTIZE = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]


def _random_blocks(qtype: str, rows: int, blocks_per_row: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    type_size = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]][1]
    raw = rng.integers(0, 256, size=(rows, blocks_per_row, type_size), dtype=np.uint8)
    for at in F16_FIELDS[qtype]:
        scales = rng.normal(0.0, 0.02, size=(rows, blocks_per_row, 1)).astype(np.float16)
        raw[:, :, at : at + 2] = scales.view(np.uint8)
    if qtype == "IQ1_M":  # its float16 scale is the top nibbles of 4 fields: clear its top exponent bit (finite)
        raw[:, :, 55] &= 0xBF
    return raw.reshape(rows, blocks_per_row * type_size)


@pytest.mark.parametrize("qtype", list(F16_FIELDS))
def test_gguf_dequantize_equals_gguf_py(qtype):
    block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    raw = _random_blocks(qtype, rows=64, blocks_per_row=3, seed=sum(map(ord, qtype)))
    reference = torch.from_numpy(gguf_dequantize(raw, GGMLQuantizationType[qtype]).copy())
    qweight = GGUFWeight(torch.from_numpy(raw.copy()), qtype, 3 * block_size)
    assert torch.equal(qweight.dequantize(), reference)
    _assert_tiles(qweight, reference)
    assert torch.equal(_round_trip(qweight).dequantize(), reference)
    assert qweight.bits_per_weight == 8 * type_size / block_size


@pytest.mark.parametrize("qtype", GGUF_PY_CAN_QUANTIZE + ["F16", "BF16", "F32"])
def test_gguf_real_weights_quantized_by_gguf_py(layer_weights, qtype):
    ggml = GGMLQuantizationType[qtype]
    w = layer_weights["q_proj"].numpy()
    encoded = gguf_quantize(w, ggml)
    reference = torch.from_numpy(np.asarray(gguf_dequantize(encoded, ggml), dtype=np.float32))
    raw = torch.from_numpy(np.ascontiguousarray(encoded).view(np.uint8).reshape(w.shape[0], -1).copy())
    qweight = GGUFWeight(raw, qtype, w.shape[1])
    assert torch.equal(qweight.dequantize(), reference)
    _assert_tiles(qweight, reference)
    if qtype != "F32":
        assert 0 < (reference - torch.from_numpy(w)).abs().max() < 0.1 * np.abs(w).max()


IQ4_NL_VALUES = [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113]  # ggml's kvalues_iq4nl


def test_iq4_nl_is_its_documented_codebook():
    """ggml's block_iq4_nl, written out in float64: a float16 scale, then 32 four-bit indices into a fixed
    non-linear codebook, the 16 low nibbles first."""
    raw = _random_blocks("IQ4_NL", rows=4, blocks_per_row=2, seed=5)
    got = GGUFWeight(torch.from_numpy(raw.copy()), "IQ4_NL", 64).dequantize(torch.float64)
    blocks = raw.reshape(4, 2, 18)
    d = blocks[:, :, :2].copy().view(np.float16).astype(np.float64)
    qs = blocks[:, :, 2:]
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)
    want = (d * np.asarray(IQ4_NL_VALUES, dtype=np.float64)[codes]).reshape(4, 64)
    assert torch.equal(got, torch.from_numpy(want))


def test_gguf_weight_rejects_bad_input():
    with pytest.raises(EngineError, match="unsupported GGML tensor type 'Q8_K'"):
        GGUFWeight(torch.zeros(2, 292, dtype=torch.uint8), "Q8_K", 256)
    with pytest.raises(EngineError, match="bytes per row"):
        GGUFWeight(torch.zeros(2, 35, dtype=torch.uint8), "Q8_0", 32)


# ---------------------------------------------------------------------------------------------
# Quantized GGUF models


@pytest.fixture(scope="module")
def gguf_q8(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "stories260K-Q8_0.gguf"
    chosen = quantize_gguf(GGUF_MODEL, path, "Q8_0")
    # 172-wide FFN inputs are not whole 32-weight blocks: llama.cpp's float16 fallback.
    assert {name: t for name, t in chosen.items() if t != "Q8_0"} == {f"blk.{i}.ffn_down.weight": "F16" for i in range(5)}
    return path


def test_quantized_gguf_loads_into_modulora_layers(gguf_q8, float_model, valid_windows):
    assert is_quantized_gguf(gguf_q8) and not is_quantized_gguf(GGUF_MODEL)
    model, _, manifest = load_model(gguf_q8)
    assert manifest["quantizer"] == {"method": "gguf", "ggml_types": {"Q8_0": 30, "F16": 5}}
    assert len(manifest["layers"]) == 35

    # transformers' own loader dequantizes with gguf-py and undoes llama.cpp's Q/K row permutation.
    reference, _ = load_float_model(gguf_q8)
    ref_state = reference.state_dict()
    for name in manifest["layers"]:
        assert torch.equal(model.get_submodule(name).base.dequantize(), ref_state[f"{name}.weight"]), name
    for key, tensor in model.state_dict().items():
        if key in ref_state:
            assert torch.equal(tensor, ref_state[key]), key

    ppl = perplexity(model, valid_windows[:N_WINDOWS], progress=False).ppl
    float_ppl = perplexity(float_model[0], valid_windows[:N_WINDOWS], progress=False).ppl
    assert abs(ppl - float_ppl) < 0.005 * float_ppl, (ppl, float_ppl)


def test_quantized_gguf_model_saves_and_reloads(gguf_q8, tmp_path):
    model, tokenizer, manifest = load_model(gguf_q8)
    saved = _assert_reloads_identically(model, tokenizer, tmp_path / "q8", {"quantizer": manifest["quantizer"]})
    assert saved["size"]["bits_per_weight"] == manifest["size"]["bits_per_weight"]


def test_quantize_gguf_refuses_k_quants(tmp_path):
    with pytest.raises(EngineError, match="cannot quantize to Q4_K"):
        quantize_gguf(GGUF_MODEL, tmp_path / "k.gguf", "Q4_K")
    assert not (tmp_path / "k.gguf").exists()
