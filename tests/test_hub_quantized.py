"""Hub GPTQ and AWQ checkpoints used as they are: packed by the reference packers (AutoGPTQ's ``QuantLinear.pack``,
AutoAWQ's ``WQLinear_GEMM.from_linear``), our dequantization equals the references' own unpacking bit for bit (GPTQ
at 2, 3, 4 and 8 bits, AWQ at 4), and a checkpoint in the hub layout made from the shared model loads, matches
transformers with the same weights, and finetunes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import GGUF_MODEL, TRAIN_TXT, VALID_TXT, modulora
from engine.lora import ModuLoRALinear
from engine.model import load_model, target_linear_names
from engine.quant import AWQPackedWeight, GPTQPackedWeight

GROUP = 32


def reference_quant_linear() -> type:
    """AutoGPTQ's ``QuantLinear`` (cuda-old: packing in numpy, unpacking in torch where no CUDA kernel is built),
    read from its file (the package's ``__init__`` imports model code written for older transformers)."""
    package = importlib.util.find_spec("auto_gptq")
    path = Path(package.submodule_search_locations[0]) / "nn_modules" / "qlinear" / "qlinear_cuda_old.py"
    spec = importlib.util.spec_from_file_location("auto_gptq_qlinear_cuda_old", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.QuantLinear


def packed_by_reference(weight: torch.Tensor, bits: int, method: str = "gptq") -> tuple[object, torch.Tensor, torch.Tensor]:
    """``weight`` ``[out, in]`` as codes ``q`` with float16 scales ``s`` and zero points ``z`` per group of 32
    inputs, its float16 rounding packed by ``method``'s reference; returns the reference's layer, that float16
    weight and ``s (q - z)`` in float32 (exact there)."""
    out, n_in = weight.shape
    groups = weight.float().view(out, n_in // GROUP, GROUP)
    low, high = groups.amin(-1), groups.amax(-1)
    maxq = 2**bits - 1
    scales = ((high - low) / maxq).clamp(min=1e-4).half()
    zeros = torch.round(-low / scales.float()).clamp(0, maxq)
    codes = torch.round(groups / scales.float().unsqueeze(-1) + zeros.unsqueeze(-1)).clamp(0, maxq)
    exact32 = (scales.float().unsqueeze(-1) * (codes - zeros.unsqueeze(-1))).view(out, n_in)
    exact = exact32.half()
    linear = torch.nn.Linear(n_in, out, bias=False).half()
    linear.weight.data = exact
    if method == "awq":
        from awq.modules.linear.gemm import WQLinear_GEMM

        return WQLinear_GEMM.from_linear(linear, bits, GROUP, scales=scales.T.contiguous(),
                                         zeros=zeros.T.contiguous()), exact, exact32
    layer = reference_quant_linear()(bits, GROUP, n_in, out, False)
    layer.pack(linear, scales, zeros.clone(), torch.arange(n_in) // GROUP)
    return layer, exact, exact32


def reference_dense(layer) -> torch.Tensor:
    """The reference's own unpacking: its forward of the identity (float16, exact) is ``W^T``."""
    with torch.no_grad():
        return layer(torch.eye(layer.infeatures, dtype=torch.float16)).T


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_dequantization_equals_the_reference_unpacking(bits, float_model):
    weight = float_model[0].model.layers[0].self_attn.k_proj.weight.detach()  # [32, 64]
    layer, exact, exact32 = packed_by_reference(weight, bits)
    ours = GPTQPackedWeight(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, bits)
    assert torch.equal(reference_dense(layer), exact)  # the packer round-trips this weight
    assert torch.equal(ours.dequantize(torch.float16), reference_dense(layer))
    assert torch.equal(ours.dequantize(torch.float32), exact32)  # the packed codes are the codes given
    tile = ours.dequantize(torch.float32, rows=(3, 29), cols=(32, 64))
    assert torch.equal(tile, exact32[3:29, 32:64])


def test_awq_dequantization_equals_the_reference_unpacking(float_model):
    from awq.utils.packing_utils import dequantize_gemm

    weight = float_model[0].model.layers[0].self_attn.k_proj.weight.detach()
    layer, exact, exact32 = packed_by_reference(weight, 4, "awq")
    reference = dequantize_gemm(layer.qweight, layer.qzeros, layer.scales, 4, GROUP).T  # [out, in], float16
    ours = AWQPackedWeight(layer.qweight, layer.qzeros, layer.scales, GROUP)
    assert torch.equal(reference, exact)
    assert torch.equal(ours.dequantize(torch.float16), reference)
    assert torch.equal(ours.dequantize(torch.float32), exact32)
    assert torch.equal(ours.dequantize(torch.float32, rows=(3, 29), cols=(32, 64)), exact32[3:29, 32:64])


def test_act_order_groups_follow_g_idx(float_model):
    """An act-order checkpoint's ``g_idx`` assigns inputs to groups out of order: each input is scaled by its
    own group, as a plain loop over inputs does it."""
    weight = float_model[0].model.layers[0].self_attn.k_proj.weight.detach()
    layer, _, _ = packed_by_reference(weight, 4)
    g_idx = torch.randperm(64, generator=torch.Generator().manual_seed(0)).int() % 2
    ours = GPTQPackedWeight(layer.qweight, layer.qzeros, layer.scales, g_idx, 4)
    sequential = GPTQPackedWeight(layer.qweight, layer.qzeros, layer.scales, None, 4)
    codes = sequential.dequantize(torch.float64) / layer.scales.double()[torch.arange(64) // GROUP].T \
        + sequential.zero_points((0, 32)).double()[torch.arange(64) // GROUP].T  # q, recovered exactly
    zeros, scales = sequential.zero_points((0, 32)).double(), layer.scales.double()
    want = torch.stack([scales[g] * (codes[:, i].round() - zeros[g]) for i, g in enumerate(g_idx.tolist())], dim=1)
    torch.testing.assert_close(ours.dequantize(torch.float64), want, rtol=0, atol=1e-12)


QUANT_CONFIGS = {
    "gptq": {"quant_method": "gptq", "bits": 4, "group_size": GROUP, "desc_act": False, "sym": False,
             "checkpoint_format": "gptq"},
    "awq": {"quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": True, "version": "gemm"},
}


@pytest.fixture(scope="module", params=list(QUANT_CONFIGS))
def hub_checkpoint(request, float_model, tmp_path_factory) -> Path:
    """The shared model in the hub GPTQ or AWQ layout, 4 bits, group 32: the attention projections packed by the
    reference; the MLP's (172 wide, which the layouts cannot pack) stay float, as hub checkpoints leave such
    layers."""
    model, tokenizer = float_model
    method = request.param
    path = tmp_path_factory.mktemp(method) / f"stories-{method}"
    tensors = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    for name in target_linear_names(model):
        weight = tensors[f"{name}.weight"]
        if weight.shape[0] % GROUP or weight.shape[1] % GROUP:
            continue
        layer = packed_by_reference(weight, 4, method)[0]
        del tensors[f"{name}.weight"]
        keys = ("qweight", "qzeros", "scales", "g_idx") if method == "gptq" else ("qweight", "qzeros", "scales")
        tensors.update({f"{name}.{key}": getattr(layer, key).contiguous() for key in keys})
    path.mkdir()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config["quantization_config"] = QUANT_CONFIGS[method]
    (path / "config.json").write_text(json.dumps(config))
    tokenizer.save_pretrained(path)
    return path


def test_a_hub_checkpoint_loads_packed_and_computes_its_weights(hub_checkpoint, float_model):
    import copy

    model, _, manifest = load_model(hub_checkpoint)
    method = json.loads((hub_checkpoint / "config.json").read_text())["quantization_config"]["quant_method"]
    assert manifest["quantizer"]["method"] == f"{method}-checkpoint"
    assert len(manifest["layers"]) == 4 * 5  # q, k, v, o of 5 blocks
    reference = copy.deepcopy(float_model[0])
    for name, layer in model.named_modules():
        if isinstance(layer, ModuLoRALinear):
            assert isinstance(layer.base, {"gptq": GPTQPackedWeight, "awq": AWQPackedWeight}[method])
            original = reference.get_submodule(name).weight
            original.data = packed_by_reference(original.detach(), 4, method)[2]
    ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_finetune_and_evaluate_on_a_hub_checkpoint(hub_checkpoint, tmp_path):
    assert modulora("finetune", hub_checkpoint, "--data", TRAIN_TXT, "--limit", 8, "--seq-len", 64, "--steps", 2,
                    "--batch-size", 4, "--rank", 4, "--save-every", 0, "--out", tmp_path / "run") == 0
    assert modulora("eval", tmp_path / "run", "--data", VALID_TXT, "--limit", 2, "--seq-len", 64) == 0
    assert modulora("export", tmp_path / "run", "--merged", "--out", tmp_path / "export") == 0
    from transformers import AutoModelForCausalLM

    from engine.pipelines.loading import load_with_adapter

    ours, _, _ = load_with_adapter(tmp_path / "run")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "export" / "merged").eval()
    ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, ours(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_export_in_the_gptq_layout_is_read_by_the_reference_and_our_loader(tmp_path):
    """``export --gptq``: each packable layer's tensors, given to AutoGPTQ's QuantLinear, unpack to our weight bit
    for bit (RTN, sequential groups; the reference ignores g_idx), and an act-order OPTQ export loads back (hub
    path, g_idx) with every packed weight equal to the quantized directory's."""
    from engine.quant import GroupQuantizedWeight

    calib = ("--calib", TRAIN_TXT, "--calib-windows", 8, "--calib-seq-len", 64)
    for method, options in (("rtn", ()), ("optq", ("--act-order", *calib))):
        q = tmp_path / method
        assert modulora("quantize", GGUF_MODEL, "--method", method, "--bits", 4, "--group-size", GROUP, *options,
                        "--out", q) == 0
        assert modulora("finetune", q, "--data", TRAIN_TXT, "--limit", 4, "--seq-len", 64, "--steps", 1,
                        "--batch-size", 4, "--rank", 4, "--save-every", 0, "--out", tmp_path / f"run-{method}") == 0
        assert modulora("export", tmp_path / f"run-{method}", "--gptq", "--out", tmp_path / f"export-{method}") == 0
        ours, _, _ = load_model(q)
        exported, _, manifest = load_model(tmp_path / f"export-{method}" / "gptq")
        assert manifest["quantizer"]["method"] == "gptq-checkpoint" and len(manifest["layers"]) == 4 * 5  # q,k,v,o
        for name, layer in ours.named_modules():
            if not isinstance(layer, ModuLoRALinear):
                continue
            assert isinstance(layer.base, GroupQuantizedWeight)
            got = exported.get_submodule(name)
            if name not in manifest["layers"]:  # 172-wide MLP: dequantized, float16
                assert torch.equal(got.weight, layer.base.dequantize(torch.float32).half())
                continue
            assert torch.equal(got.base.dequantize(torch.float32), layer.base.dequantize(torch.float32))
            if method == "rtn":
                reference = reference_quant_linear()(4, GROUP, layer.in_features, layer.out_features, False)
                for key in ("qweight", "qzeros", "scales", "g_idx"):
                    setattr(reference, key, getattr(got.base, key))
                assert torch.equal(reference_dense(reference), layer.base.dequantize(torch.float16))
