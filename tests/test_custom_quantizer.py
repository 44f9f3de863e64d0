"""docs/custom_quantizer.md's worked example, run as written (paths pointed at the test's files)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from conftest import SHARED

DOC = Path(__file__).resolve().parent.parent / "docs" / "custom_quantizer.md"


def code_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_worked_example_runs_and_round_trips(tmp_path):
    definitions, usage = code_blocks()
    namespace: dict = {}
    exec(compile(definitions, str(DOC), "exec"), namespace)
    usage = usage.replace("../shared", str(SHARED)).replace("out/ternary", str(tmp_path / "ternary"))
    usage = usage.replace("print(perplexity(reloaded, windows[:64]).ppl)", "")
    exec(compile(usage, str(DOC), "exec"), namespace)
    model, reloaded, windows = namespace["model"], namespace["reloaded"], namespace["windows"]
    perplexity = namespace["perplexity"]
    before = perplexity(model, windows[:16], progress=False).ppl
    after = perplexity(reloaded, windows[:16], progress=False).ppl
    assert before == after and math.isfinite(before)
    assert namespace["manifest"]["layers"]["model.layers.0.mlp.down_proj"]["format"] == "ternary"

    # the format itself, against its definition
    weight = torch.randn(6, 172)
    q = namespace["TernaryQuantizer"]().quantize(weight)
    scale = weight.abs().mean(dim=1, keepdim=True).half().float()
    expected = torch.clamp(torch.round(weight / weight.abs().mean(dim=1, keepdim=True)), -1, 1) * scale
    assert torch.equal(q.dequantize(), expected)
    assert torch.equal(q.dequantize(rows=(1, 4), cols=(100, 172)), expected[1:4, 100:172])
