"""Hub model ids through the console script users run: out of reach and not cached, one line at once (before the
seconds of torch and transformers imports); cached, the local copy is used offline."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from conftest import VALID_TXT


def console(*args: str, **env: str) -> tuple[int, list[str], float]:
    """``modulora ARGS`` through the console entry point: exit code, stderr lines, seconds."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", "from engine.console import main; main()", *args],
                          capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1", **env})
    return done.returncode, [line for line in done.stderr.splitlines() if line.strip()], time.perf_counter() - start


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "https://hub.invalid"}],
                         ids=["HF_HUB_OFFLINE", "no-network"])
@pytest.mark.parametrize("command", ["eval", "finetune", "quantize"])
def test_an_unreachable_hub_id_fails_at_once_in_one_line(command, env, tmp_path):
    code, err, seconds = console(command, "someone/some-model", "--data", str(VALID_TXT), "--out", str(tmp_path / "o"),
                                 HF_HUB_CACHE=str(tmp_path / "cache"), **env)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("modulora: error: someone/some-model: not a local path, and the hub is out of reach (")
    assert seconds < 5


def test_a_cached_hub_id_loads_offline(float_model, tmp_path):
    model, tokenizer = float_model
    snapshot = tmp_path / "cache" / "models--someone--stories" / "snapshots" / ("0" * 40)
    model.save_pretrained(snapshot)
    tokenizer.save_pretrained(snapshot)
    (tmp_path / "cache" / "models--someone--stories" / "refs").mkdir()
    (tmp_path / "cache" / "models--someone--stories" / "refs" / "main").write_text("0" * 40)
    code, err, _ = console("eval", "someone/stories", "--data", str(VALID_TXT), "--limit", "2", "--seq-len", "64",
                           HF_HUB_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="0", HF_ENDPOINT="https://hub.invalid")
    assert code == 0, err
