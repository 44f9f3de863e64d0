"""llama.cpp (through llama-cpp-python, built from PyPI) as the independent reference for GGUF: the engine's
perplexity of a quantized GGUF equals llama.cpp's on the same tokens, and what `modulora export --gguf` writes
loads in llama.cpp with the engine's logits (the merged model, and the LoRA on the GGUF it was trained on)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import GGUF_MODEL, TRAIN_TXT, modulora
from gguf_llama_cpp import LlamaCpp, quantize_with_llama_cpp
from engine.eval import perplexity
from engine.export import attach_adapter
from engine.model import load_model, quantize_gguf

llama_cpp = pytest.importorskip("llama_cpp")  # a test dependency (pyproject's test extra); skipped only outside it

pytestmark = pytest.mark.slow


def llama_logits(model_path: Path, tokens: list[int], lora_path: Path | None = None) -> np.ndarray:
    """llama.cpp's logits (float64) at every position of ``tokens``."""
    llama = LlamaCpp(model_path, len(tokens), lora_path)
    logits = llama.logits(tokens)
    llama.close()
    return logits


def engine_logits(model: torch.nn.Module, tokens: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].double().numpy()


@pytest.mark.parametrize("qtype", ["Q4_0", "Q8_0", "Q4_K_M"])
def test_perplexity_of_a_quantized_gguf_equals_llama_cpps(qtype, valid_windows, tmp_path):
    path = tmp_path / f"{qtype}.gguf"
    if qtype.endswith("_M"):
        quantize_with_llama_cpp(GGUF_MODEL, path, qtype)
    else:
        quantize_gguf(GGUF_MODEL, path, qtype)
    windows = valid_windows[:24]
    model, _, manifest = load_model(path)
    assert manifest["quantizer"]["method"] == "gguf"  # kept packed, not dequantized on load
    ours = perplexity(model, windows, progress=False).ppl
    llama = LlamaCpp(path, windows.shape[1])
    theirs = llama.perplexity(windows.tolist())
    llama.close()
    print(f"{qtype}: engine {ours:.4f}, llama.cpp {theirs:.4f}, {abs(ours / theirs - 1):.2e}")
    assert abs(ours / theirs - 1) < 0.005


def finetune(base: Path, out: Path) -> Path:
    """A short finetune (rank 4, lr 1e-2: an adapter far from zero) through the command line."""
    assert modulora("finetune", base, "--data", TRAIN_TXT, "--limit", 16, "--seq-len", 64, "--steps", 4,
                    "--batch-size", 4, "--rank", 4, "--lr", 0.01, "--save-every", 0, "--out", out) == 0
    return out


def test_merged_gguf_export_of_a_quantized_directory_runs_in_llama_cpp(valid_windows, tmp_path):
    """A 4-bit directory quantized from the GGUF (its blocks streamed while exporting), finetuned, exported as an
    F32 GGUF: llama.cpp's logits are the engine's on the finetuned model (float32 arithmetic on both sides)."""
    assert modulora("quantize", GGUF_MODEL, "--method", "rtn", "--bits", 4, "--out", tmp_path / "q4") == 0
    run = finetune(tmp_path / "q4", tmp_path / "run")
    assert modulora("export", run, "--gguf", "F32", "--out", tmp_path / "export") == 0
    model, _, manifest = load_model(tmp_path / "q4")
    attach_adapter(model, run / "adapter", base_manifest=manifest)
    tokens = valid_windows[0, :128].tolist()
    ours = engine_logits(model, tokens)
    theirs = llama_logits(tmp_path / "export" / "gguf" / "model.gguf", tokens)
    base, _, _ = load_model(tmp_path / "q4")
    effect = np.abs(ours - engine_logits(base, tokens)).max()
    gap = np.abs(ours - theirs).max()
    print(f"merged F32 GGUF: max |llama.cpp - engine| {gap:.2e}; the adapter moves logits by up to {effect:.2e}")
    assert effect > 0.1  # the adapter matters, so a GGUF that dropped it would fail below
    assert gap < 1e-3


def test_gguf_lora_export_runs_on_its_base_in_llama_cpp(valid_windows, tmp_path):
    """Finetuned on a Q8_0 GGUF; llama.cpp runs that file with the exported lora.gguf, and the merged Q8_0 export.
    llama.cpp rounds activations to 8 bits for Q8_0 matmuls (the engine does not), so its logits of the base alone
    already differ from the engine's: the LoRA must add no more than that, while moving the logits far more."""
    base = tmp_path / "q8.gguf"
    quantize_gguf(GGUF_MODEL, base, "Q8_0")
    run = finetune(base, tmp_path / "run")
    assert modulora("export", run, "--gguf", "Q8_0", "--out", tmp_path / "export") == 0
    tokens = valid_windows[0, :128].tolist()
    model, _, manifest = load_model(base)
    ours_base = engine_logits(model, tokens)
    attach_adapter(model, run / "adapter", base_manifest=manifest)
    ours = engine_logits(model, tokens)
    base_gap = np.abs(llama_logits(base, tokens) - ours_base).max()
    lora_gap = np.abs(llama_logits(base, tokens, lora_path=tmp_path / "export" / "gguf" / "lora.gguf") - ours).max()
    merged_gap = np.abs(llama_logits(tmp_path / "export" / "gguf" / "model.gguf", tokens) - ours).max()
    effect = np.abs(ours - ours_base).max()
    print(f"Q8_0: max |llama.cpp - engine| base {base_gap:.2e}, base + lora.gguf {lora_gap:.2e}, merged model.gguf "
          f"{merged_gap:.2e}; the adapter moves logits by up to {effect:.2e}")
    assert effect > 5 * base_gap
    assert lora_gap < 1.5 * base_gap
    assert merged_gap < 2 * base_gap  # the merged weights rounded to Q8_0 once more


def test_gguf_export_needs_a_gguf_source(float_model, tmp_path, capsys):
    model, tokenizer = float_model
    model.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    assert modulora("quantize", tmp_path / "hf", "--method", "rtn", "--bits", 4, "--out", tmp_path / "q4") == 0
    run = finetune(tmp_path / "q4", tmp_path / "run")
    capsys.readouterr()
    assert modulora("export", run, "--gguf", "Q8_0", "--out", tmp_path / "export") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a GGUF file" in err[0] and "convert_hf_to_gguf.py" in err[0]
    assert not (tmp_path / "export").exists()
