"""A full disk: the command stops with one line naming the file and ``No space left on device`` (exit 2), and what the
user had before is still there and loads.  The disk is a small tmpfs mounted for the test (needs root; skipped
where mounting is not allowed)."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import GGUF_MODEL, TRAIN_TXT, VALID_TXT, directory_tensors, modulora

pytestmark = pytest.mark.skipif(os.name != "posix" or os.geteuid() != 0, reason="mounting a tmpfs needs root")

FINETUNE = ("--data", TRAIN_TXT, "--seq-len", 64, "--limit", 8, "--batch-size", 4, "--rank", 4, "--save-every", 1)


@pytest.fixture
def disk(tmp_path) -> Path:
    """A 4 MiB tmpfs, unmounted after the test."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


@pytest.fixture(scope="module")
def q4(tmp_path_factory) -> Path:
    """The shared model, RTN 4-bit, on the ordinary disk."""
    q = tmp_path_factory.mktemp("q4") / "q"
    assert modulora("quantize", GGUF_MODEL, "--method", "rtn", "--bits", 4, "--out", q) == 0
    return q


def fill(disk: Path, leave: int) -> Path:
    """Take all of the disk's free space but ``leave`` bytes."""
    filler = disk / "filler"
    stat = os.statvfs(disk)
    size = stat.f_bavail * stat.f_frsize - leave
    with open(filler, "wb") as f:
        f.truncate(0)
        try:
            f.write(b"\0" * size)
        except OSError as exc:  # tmpfs rounds to pages: the last one may not fit
            assert exc.errno == errno.ENOSPC
    return filler


def no_space_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("modulora")]  # beside the progress bars
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("modulora: error: "), err[-2000:]
    assert lines[0].endswith("No space left on device"), lines[0]
    return lines[0]


def test_quantize_overwrite_on_a_full_disk_keeps_the_old_directory(disk, capsys):
    q = disk / "q"
    assert modulora("quantize", GGUF_MODEL, "--method", "rtn", "--bits", 4, "--out", q) == 0
    before = directory_tensors(q)
    filler = fill(disk, leave=128 << 10)  # room for some of the new blocks, not for all
    capsys.readouterr()
    assert modulora("quantize", GGUF_MODEL, "--method", "rtn", "--bits", 3, "--out", q, "--overwrite") == 2
    assert ".q.staging-" in no_space_line(capsys)  # a safetensors write, named by its file
    filler.unlink()
    assert sorted(p.name for p in disk.iterdir()) == [".q.lock", "q"]  # no staging folder left behind
    assert directory_tensors(q).keys() == before.keys()
    assert all((directory_tensors(q)[k] == v).all() for k, v in before.items())
    assert modulora("eval", q, "--data", VALID_TXT, "--limit", 2, "--seq-len", 64) == 0  # seal and checksums hold


def test_finetune_on_a_full_disk_resumes_to_the_uninterrupted_adapter(disk, q4, tmp_path, capsys):
    q = q4
    whole = tmp_path / "whole"
    assert modulora("finetune", q, *FINETUNE, "--steps", 4, "--out", whole) == 0
    run = disk / "run"
    assert modulora("finetune", q, *FINETUNE, "--steps", 2, "--out", run) == 0
    filler = fill(disk, leave=16 << 10)  # room for the run record, not for the next checkpoint
    capsys.readouterr()
    assert modulora("finetune", q, *FINETUNE, "--steps", 4, "--resume", "--out", run) == 2
    assert "/checkpoints/" in no_space_line(capsys)
    filler.unlink()
    assert modulora("finetune", q, *FINETUNE, "--steps", 4, "--resume", "--out", run) == 0
    got = load_file(run / "adapter" / "adapter_model.safetensors")
    want = load_file(whole / "adapter" / "adapter_model.safetensors")
    assert got.keys() == want.keys() and all((got[k] == want[k]).all() for k in want)


def test_export_overwrite_on_a_full_disk_keeps_the_old_export(disk, q4, tmp_path, capsys):
    run = tmp_path / "run"
    assert modulora("finetune", q4, *FINETUNE, "--steps", 1, "--out", run) == 0
    out = disk / "export"
    assert modulora("export", run, "--merged", "--dtype", "float32", "--out", out) == 0
    kept = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    filler = fill(disk, leave=64 << 10)
    capsys.readouterr()
    assert modulora("export", run, "--merged", "--dtype", "float32", "--out", out, "--overwrite") == 2
    no_space_line(capsys)
    filler.unlink()
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == kept
