"""The device setting: resolved once per use case, honoured from the command line and from a recipe's hardware."""

from __future__ import annotations

import copy

import pytest
import torch
import yaml
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import GGUF_MODEL, TRAIN_TXT, VALID_TXT, modulora
from engine.errors import EngineError
from engine.lora.function import cpu_has_half_matmul
from engine.placement import Placement, resolve_device

NO_CUDA = not torch.cuda.is_available()


def test_auto_is_the_cpu_without_a_gpu_and_names_are_checked():
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(EngineError, match="not one of auto, cuda, cpu"):
        resolve_device("tpu")
    placement = Placement.of("cpu", torch.bfloat16)
    assert placement.describe() == {"device": "cpu", "compute_dtype": "bfloat16"} and placement.peak_bytes() is None


@pytest.mark.skipif(not NO_CUDA, reason="a machine without CUDA")
@pytest.mark.parametrize("command", [
    ["finetune", GGUF_MODEL, "--data", TRAIN_TXT, "--steps", 1, "--out", "{tmp}/run"],
    ["eval", GGUF_MODEL, "--data", VALID_TXT, "--limit", 1],
    ["quantize", GGUF_MODEL, "--method", "rtn", "--out", "{tmp}/q"],
    ["export", "{tmp}/run", "--out", "{tmp}/e"],
])
def test_cuda_without_a_gpu_is_one_line_and_exit_code_2(tmp_path, capsys, command):
    args = [str(a).replace("{tmp}", str(tmp_path)) for a in command]
    assert modulora(*args, "--device", "cuda") == 2  # refused before anything is read or written
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no CUDA device is visible" in err and "--device cpu" in err


def test_a_recipes_hardware_device_reaches_every_stage(tmp_path):
    from recipes.load import load_recipe
    from recipes.specs import eval_spec, export_spec, finetune_spec, quantize_spec, task_specs

    recipe = {
        "model": {"path": str(GGUF_MODEL), "shape": "llama-7b"},  # the shape the hardware section is planned at
        "quantize": {"method": "rtn", "bits": 3},
        "finetune": {"data": {"file": str(TRAIN_TXT), "seq_len": 64}, "train": {"steps": 2, "batch_size": 2}},
        "evaluate": {"tasks": [{"file": str(VALID_TXT), "format": "text"}]},
        "export": {},
        "hardware": {"host_mem": "64GiB", "device": "cpu"},
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    loaded = load_recipe(path)
    specs = [quantize_spec(loaded, tmp_path / "q"), finetune_spec(loaded, "m", tmp_path / "f", False),
             eval_spec(loaded, "m", task_specs(loaded)), export_spec(loaded, "run", tmp_path / "e")]
    assert [s.device for s in specs] == ["cpu"] * 4
    del recipe["hardware"]
    path.write_text(yaml.safe_dump(recipe))
    assert finetune_spec(load_recipe(path), "m", tmp_path / "f", False).device == "auto"
    recipe["finetune"]["device"] = "cpu"  # one place for the device: a stage's own key is refused
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(EngineError, match="device"):
        load_recipe(path)


class MatmulDtypes(TorchDispatchMode):
    """The dtypes of every matrix product's operands run under it, and the largest operand."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[torch.dtype] = set()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
            operands = [a for a in args if isinstance(a, torch.Tensor)]
            self.seen.update(a.dtype for a in operands)
            self.largest = max(self.largest, *(a.numel() for a in operands))
        return func(*args, **(kwargs or {}))


@pytest.mark.skipif(cpu_has_half_matmul(torch.bfloat16), reason="this CPU has bfloat16 GEMMs: products stay bfloat16")
def test_a_placed_bfloat16_model_s_float_layers_multiply_in_bounded_float32_chunks(monkeypatch):
    """A loaded bfloat16 float model placed on such a CPU (a calibration pass, a teacher): every product of its
    float linear layers runs in float32, no operand larger than the chunk, and answers in bfloat16 what float64
    math gives to bfloat16's precision; with gradients the product stays torch's own."""
    from engine.lora import function
    from engine.model import load_float_model, place

    model, _ = load_float_model(GGUF_MODEL, dtype=torch.bfloat16)
    place(model, "cpu")
    monkeypatch.setattr(function, "PRODUCT_CHUNK", 4096)  # the shared model's layers span several chunks
    ids = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), MatmulDtypes() as products:
        logits = model(input_ids=ids).logits
    assert logits.dtype == torch.bfloat16 and products.seen == {torch.float32} and products.largest <= 4096

    layer = place(torch.nn.Linear(300, 170, dtype=torch.bfloat16), "cpu")
    x = torch.randn(3, 50, 300, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = layer(x)
    want = x.double() @ layer.weight.double().T + layer.bias.double()
    torch.testing.assert_close(got.double(), want, rtol=2**-8, atol=1e-6)  # a bfloat16 rounding of the result
    with MatmulDtypes() as products:
        layer(x.requires_grad_()).float().sum().backward()
    assert products.seen == {torch.bfloat16}


@pytest.mark.skipif(cpu_has_half_matmul(torch.bfloat16), reason="this CPU has bfloat16 GEMMs: products stay bfloat16")
def test_a_half_precision_modulora_layer_multiplies_in_float32_on_a_cpu_without_half_gemms(q3):
    """Where torch's half-precision GEMMs are its slow generic kernels (engine.lora.function.matmul_dtype), a
    ModuLoRA layer computing in bfloat16 runs every product, forward and backward, in float32, and still answers
    (output and input gradient) in bfloat16."""
    from engine.lora import ModuLoRALinear

    qweight = copy.deepcopy(q3.get_submodule("model.layers.0.mlp.down_proj").base)
    layer = ModuLoRALinear(qweight, rank=4, alpha=8.0, compute_dtype=torch.bfloat16)
    x = torch.randn(2, 8, layer.in_features, dtype=torch.bfloat16, requires_grad=True)
    with MatmulDtypes() as products:
        y = layer(x)
        y.float().sum().backward()
    assert y.dtype == x.grad.dtype == torch.bfloat16 and products.seen == {torch.float32}
