"""``--limit`` bounds what is read: a 200 MB text file costs eval and finetune what its first windows cost."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import GGUF_MODEL, TRAIN_TXT

pytestmark = pytest.mark.slow  # a 200 MB file and two subprocesses


def peak_rss_gib(args: list) -> float:
    """Peak RSS of ``modulora ARGS`` (the whole process, /usr/bin/time -v)."""
    done = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-m", "engine.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    return int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)[1]) / 2**20


def test_a_200_mb_file_with_limit_64_stays_under_1_gib(tmp_path):
    text = TRAIN_TXT.read_text()
    big = tmp_path / "big.txt"
    with open(big, "w") as f:
        for _ in range(-(-200_000_000 // len(text))):
            f.write(text)
    assert big.stat().st_size >= 200_000_000
    common = ["--data", big, "--limit", 64, "--seq-len", 64]
    assert peak_rss_gib(["eval", GGUF_MODEL, *common]) < 1.0
    assert peak_rss_gib(["finetune", GGUF_MODEL, *common, "--steps", 1, "--batch-size", 4,
                         "--out", tmp_path / "run"]) < 1.0
