"""Which transformers causal LMs go through the product: quantize (RTN, OPTQ, QuIP#) -> finetune -> export (merged
model and PEFT adapter), each through the ``modulora`` command line, on a tiny random-weight model of each
architecture written in the Hugging Face layout with the shared model's tokenizer.

Per architecture: whether each command succeeded; the fraction of the decoder blocks' matrix weights (2-D linear
weights and 3-D expert tensors) the quantized directory holds packed; the largest difference between the finetuned
model's logits and (a) transformers' own model loaded from the merged export, (b) PEFT's LoRA over transformers'
model with the same dequantized base weights.

    python bench/compat.py [--work DIR] [--archs llama,gpt2,...]

Writes ``docs/compatibility.md``.
"""

from __future__ import annotations

import argparse
import copy
import sys
import traceback
from pathlib import Path
from typing import Any

import torch

from _common import GGUF, TRAIN_TXT, Cli, table, work_dir, write_doc

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 256}
ARCHS: dict[str, dict[str, Any]] = {  # model_type -> config fields beyond TINY
    "llama": {}, "mistral": {}, "qwen2": {}, "qwen3": {"head_dim": 16},
    "gemma2": {"head_dim": 16}, "gemma3_text": {"head_dim": 16}, "phi3": {"pad_token_id": 0},
    "falcon": {"new_decoder_architecture": True, "num_kv_heads": 2}, "opt": {"ffn_dim": 128, "word_embed_proj_dim": 64},
    "gpt_neox": {}, "gpt2": {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_inner": 128, "n_positions": 256},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64, "head_dim": 16},
}  # fmt: skip
CALIB = ("--calib", TRAIN_TXT, "--calib-windows", 8, "--calib-seq-len", 64)
METHODS = {"rtn": ("--bits", 4), "optq": ("--bits", 4, *CALIB), "quip": ("--bits", 2, *CALIB)}
MOE_NOTE = (
    "Mixture-of-experts models (mixtral, qwen3_moe): transformers 5 stacks their experts into 3-D tensors when it "
    "loads; the engine builds them as the checkpoint stores them, one linear layer per expert and projection "
    "(`engine/model/experts.py`), so every expert is read tensor by tensor, quantized (calibrated on the tokens "
    "routed to it), and adapted.  The router, a plain weight, stays float: the packed share is below 100% by its "
    "size.  The exported adapter puts the experts' LoRAs in PEFT's layout for stacked experts (`target_parameters`; "
    "gate and up fused into one LoRA of twice the rank), which PEFT loads onto transformers' own model."
)
FINETUNE = ("--data", TRAIN_TXT, "--limit", 8, "--seq-len", 64, "--steps", 2, "--batch-size", 4, "--rank", 4,
            "--lr", 1e-2, "--save-every", 0)


def write_model(arch: str, path: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from engine.model import open_source

    tokenizer = open_source(GGUF).tokenizer()
    fields = {**TINY, "vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
              "eos_token_id": tokenizer.eos_token_id, **ARCHS[arch]}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **fields))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def quantized_fraction(float_dir: Path, quantized_dir: Path) -> float:
    """Packed weights over all matrix weights of the decoder blocks (linear weights, 3-D expert tensors)."""
    from transformers import AutoModelForCausalLM

    from engine.model import decoder_blocks, read_manifest

    model = AutoModelForCausalLM.from_pretrained(float_dir)
    total = sum(p.numel() for block in decoder_blocks(model) for n, p in block.named_parameters() if p.dim() >= 2)
    layers = read_manifest(quantized_dir)["layers"].values()
    return sum(layer["in_features"] * layer["out_features"] for layer in layers) / total


def logit_gaps(float_dir: Path, quantized_dir: Path, run: Path, export: Path) -> tuple[float, float]:
    """Max |logit difference| of the finetuned model against transformers on the merged export and against PEFT
    over the dequantized base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from engine.export import attach_adapter
    from engine.lora import ModuLoRALinear
    from engine.model import load_model

    ours, _, _ = load_model(quantized_dir)
    base = AutoModelForCausalLM.from_pretrained(float_dir).eval()
    for name, layer in ours.named_modules():
        if isinstance(layer, ModuLoRALinear):
            base_weight(base, name).copy_(layer.base.dequantize(torch.float32))
    attach_adapter(ours, run / "adapter")
    ids = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = ours(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(export / "merged").eval()(input_ids=ids).logits
        peft = PeftModel.from_pretrained(copy.deepcopy(base), export / "adapter").eval()(input_ids=ids).logits
    return float((merged - want).abs().max()), float((peft - want).abs().max())


def base_weight(model: torch.nn.Module, name: str) -> torch.Tensor:
    """The ``[out, in]`` weight transformers' model holds for our layer ``name``: a linear layer's, or an expert's
    slice of the stacked ``gate_up_proj`` / ``down_proj`` (``...experts.<e>.<gate|up|down>``)."""
    from engine.model import linear_weight
    from engine.model.source import expert_projection_names

    if ".experts." not in name:
        return linear_weight(model.get_submodule(name))
    experts, index, projection = name.rsplit(".", 2)
    gate, up, down = expert_projection_names(model.config)
    module = model.get_submodule(experts)
    if projection == down:
        return module.down_proj.data[int(index)]
    half = module.gate_up_proj.shape[1] // 2
    return module.gate_up_proj.data[int(index), (0 if projection == gate else half):][:half]


def check(arch: str, cli: Cli, work: Path) -> list[Any]:
    folder = work / arch
    write_model(arch, folder / "float")
    done = {}
    for method, options in METHODS.items():
        done[method] = _ok(cli, "quantize", folder / "float", "--method", method, *options, "--out", folder / method)
    fraction = quantized_fraction(folder / "float", folder / "rtn") if done["rtn"] else None
    done["finetune"] = done["rtn"] and _ok(cli, "finetune", folder / "rtn", *FINETUNE, "--out", folder / "run")
    done["export"] = done["finetune"] and _ok(cli, "export", folder / "run", "--merged", "--out", folder / "export")
    gaps = logit_gaps(folder / "float", folder / "rtn", folder / "run", folder / "export") if done["export"] else None
    mark = {True: "✔", False: "✘"}
    return [arch, *(mark[bool(done[k])] for k in ("rtn", "optq", "quip", "finetune", "export")),
            "-" if fraction is None else f"{fraction:.1%}",
            *("-" if gaps is None else f"{gap:.1e}" for gap in (gaps or (None, None)))]


def _ok(cli: Cli, *args: Any) -> bool:
    try:
        cli.run(*args)
        return True
    except SystemExit:  # Cli.run stops on a failed command; here a failure is a result
        traceback.print_exc(limit=0)
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None, help="Scratch folder [a temporary one].")
    parser.add_argument("--archs", default=",".join(ARCHS), help=f"Architectures: {', '.join(ARCHS)}.")
    args = parser.parse_args()
    with work_dir(args.work, "compat") as work:
        cli = Cli(work, threads=2)
        rows = [check(arch, cli, work) for arch in args.archs.split(",")]
    headers = ["architecture", "quantize rtn", "quantize optq", "quantize quip", "finetune", "export",
               "block matrix weights packed", "merged vs ours (max abs logit)", "PEFT vs ours (max abs logit)"]
    body = table(headers, rows) + "\n\n" + MOE_NOTE
    print(body)
    write_doc("compatibility", "Architectures through quantize, finetune and export", "compat.py", body,
              cli.commands)


if __name__ == "__main__":
    sys.exit(main())
