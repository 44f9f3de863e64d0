"""One writer per output folder: every use case that writes a folder refuses one another process holds, with one
line naming the holder, and a killed holder leaves no stale lock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import GGUF_MODEL, TRAIN_TXT, modulora
from engine.errors import EngineError
from engine.storage import lock_path, output_lock

HOLD = "import sys, time\nfrom engine.storage import output_lock\nwith output_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(600)\n"


def hold(folder: Path) -> subprocess.Popen:
    """Another process holding ``folder``'s lock until killed."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[1])
    assert holder.stdout.readline().strip() == "held"
    return holder


@pytest.fixture
def held(tmp_path):
    holder = hold(tmp_path / "out")
    yield holder
    holder.kill()
    holder.wait()


@pytest.mark.parametrize("command", [
    ["quantize", GGUF_MODEL, "--method", "rtn", "--bits", 4],
    ["finetune", GGUF_MODEL, "--data", TRAIN_TXT, "--steps", 1],
    ["correct", "QUANTIZED", "--calib", TRAIN_TXT, "--steps", 1],
    ["export", "RUN"],
])
def test_second_writer_is_refused_naming_the_holder(command, tmp_path, held, capsys):
    command = [tmp_path / "input" if a in ("QUANTIZED", "RUN") else a for a in command]
    if command[0] == "correct":  # a real quantized input, so the refusal is the lock's and not the input's
        assert modulora("quantize", GGUF_MODEL, "--method", "rtn", "--bits", 4, "--out", tmp_path / "input") == 0
    capsys.readouterr()
    code = modulora(*command, "--out", tmp_path / "out")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0] == (f"modulora: error: {tmp_path / 'out'}: in use by another modulora process (pid {held.pid}); "
                      "wait for it to finish or choose another output")
    assert not (tmp_path / "out").exists()  # nothing written


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    holder = hold(tmp_path / "out")
    with pytest.raises(EngineError, match=f"pid {holder.pid}"):
        with output_lock(tmp_path / "out"):
            pass
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    with output_lock(tmp_path / "out"):  # the kernel released the dead process's lock
        assert lock_path(tmp_path / "out").read_text().strip() == str(os.getpid())
    assert lock_path(tmp_path / "out") == tmp_path / ".out.lock"


def test_the_same_folder_named_twice_is_locked_once(tmp_path):
    """A use case naming one folder twice (an offload folder equal to its output) does not refuse itself."""
    from engine.storage import output_locks

    with output_locks(tmp_path / "out", tmp_path / "sub" / ".." / "out", None):
        assert lock_path(tmp_path / "out").read_text().strip() == str(os.getpid())


def dead_pid() -> int:
    """The pid of a process that has exited."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    return gone.pid


def test_a_swap_cut_between_its_renames_is_put_back_and_dead_staging_removed(tmp_path, capsys):
    """A quantize killed between commit_dir's two renames leaves no model at OUT, the previous one retired beside
    it: the next reader puts it back.  Staging folders of dead writers go on the next write; a live writer's
    stay."""
    from conftest import VALID_TXT
    from engine.storage import staging_dir

    q = tmp_path / "q"
    assert modulora("quantize", GGUF_MODEL, "--method", "rtn", "--bits", 4, "--out", q) == 0
    retired = tmp_path / f".q.old-{dead_pid()}"
    os.replace(q, retired)
    assert modulora("eval", q, "--data", VALID_TXT, "--limit", 2, "--seq-len", 64) == 0
    assert q.is_dir() and not retired.exists()

    dead = tmp_path / f".q.staging-{dead_pid()}-abc"
    live = tmp_path / f".q.staging-{os.getpid()}-def"
    for leftover in (dead, live):
        leftover.mkdir()
        (leftover / "half.safetensors").write_bytes(b"x" * 10)
    fresh = staging_dir(q)
    assert not dead.exists() and live.is_dir() and fresh.is_dir()
    assert fresh.name.startswith(f".q.staging-{os.getpid()}-")
