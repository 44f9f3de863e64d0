"""Shared fixtures: the real shared model and data (``../shared`` or ``$MODULORA_SHARED``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from engine.paths import shared_dir  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))  # bench/synthetic.py: random packed models

SHARED = shared_dir()
GGUF_MODEL = SHARED / "models" / "stories260K.gguf"
VALID_TXT = SHARED / "data" / "tinystories" / "valid.txt"
TRAIN_TXT = SHARED / "data" / "tinystories" / "train.txt"


# Every quantizer the engine has, at the bit widths users pick: (method, settings).
QUANT_FORMATS = [
    ("rtn", {"bits": 2, "group_size": 32}), ("rtn", {"bits": 3, "group_size": 64}),
    ("rtn", {"bits": 4, "group_size": 32, "symmetric": True}), ("rtn", {"bits": 8, "group_size": -1}),
    ("optq", {"bits": 3, "group_size": 32, "act_order": True}), ("quip", {"bits": 2}),
    ("nf4", {}), ("fp4", {}), ("hqq", {"bits": 3}), ("qtip", {"bits": 3, "tune_iters": 0}),
]


def layer_stats(n_in: int, rows: int = 512) -> Any:
    """Input statistics of a layer from seeded Gaussian inputs (for the calibrated quantizers)."""
    from engine.quant import LayerStats

    x = torch.randn(rows, n_in, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return LayerStats(x.T @ x, rows)


def modulora(*args: Any) -> int:
    """The exit code of ``modulora ARGS`` run in this interpreter (saves a subprocess's imports)."""
    from engine.cli import main

    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        return int(exc.code)
    return 0


def directory_tensors(directory: Path) -> dict[str, Any]:
    """Every tensor of a quantized directory, by file and name: two directories hold the same model exactly when
    these are equal."""
    from safetensors.torch import load_file

    return {f"{path.relative_to(directory)}:{name}": tensor for path in sorted(directory.rglob("*.safetensors"))
            for name, tensor in load_file(path).items()}


def pytest_configure(config: pytest.Config) -> None:
    if not GGUF_MODEL.is_file():
        raise pytest.UsageError(f"shared model not found at {GGUF_MODEL}; set MODULORA_SHARED")
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same global RNG state, whatever ran before it."""
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def float_model():
    """The shared float stories260K model and tokenizer (do not modify: deep-copy first)."""
    from engine.model import load_float_model

    return load_float_model(GGUF_MODEL)


@pytest.fixture(scope="module")
def q3(float_model):
    """The shared model with every decoder linear RTN 3-bit g32 (do not modify: deep-copy first)."""
    import copy

    from engine.model import quantize_model
    from engine.quant import RTNQuantizer

    model = copy.deepcopy(float_model[0])
    quantize_model(model, RTNQuantizer(bits=3, group_size=32))
    return model


@pytest.fixture(scope="session")
def valid_windows(float_model):
    """All 256-token windows of the shared validation text (the perplexity protocol)."""
    from engine.data import read_text, token_windows

    return token_windows(float_model[1], read_text(VALID_TXT), 256)
