"""bench/compat.py's check of an architecture, as a test: every command succeeds, every block matrix is packed,
and the finetuned model's logits equal transformers' on the merged export and PEFT's over the same base."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow  # each architecture: three quantizations, a finetune and an export on the CLI


@pytest.mark.parametrize("arch", ["gemma2", "falcon"])  # a scaled-embedding buffer; fused QKV with a new layout
def test_architecture_goes_through_every_command(arch, tmp_path):
    from compat import check

    from _common import Cli

    row = check(arch, Cli(tmp_path, threads=2), tmp_path)
    assert row[1:6] == ["✔"] * 5, row
    assert row[6] == "100.0%"
    assert float(row[7]) < 1e-4 and float(row[8]) < 1e-4, row
