"""What users keep is checked when it is read back: a sealed quantized manifest and adapter (an edited setting or a
flipped byte is refused with one line), bases recorded as absolute paths, and no output written over an input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import GGUF_MODEL, TRAIN_TXT, VALID_TXT, modulora
from engine.errors import EngineError


@pytest.fixture(scope="module")
def kept(tmp_path_factory) -> Path:
    """A 4-bit RTN directory and a two-step run on it, made from a relative model path and run folder."""
    work = tmp_path_factory.mktemp("kept")
    assert modulora("quantize", GGUF_MODEL, "--method", "rtn", "--bits", 4, "--out", work / "q4") == 0
    cwd = Path.cwd()
    try:
        import os

        os.chdir(work)
        assert modulora("finetune", "q4", "--data", TRAIN_TXT, "--steps", 2, "--seq-len", 64, "--limit", 8,
                        "--batch-size", 4, "--save-every", 0, "--out", "run") == 0
    finally:
        os.chdir(cwd)
    return work


def one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("modulora: error: "), lines
    return lines[0]


def evaluate(path: Path) -> int:
    return modulora("eval", path, "--data", VALID_TXT, "--limit", 2, "--seq-len", 64)


def test_intact_run_loads_from_another_directory(kept, capsys):
    config = json.loads((kept / "run" / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((kept / "q4").resolve())  # typed as "q4"
    assert evaluate(kept / "run") == 0


@pytest.mark.parametrize("edit", ["lora_alpha", "flipped-weight-byte", "manifest"])
def test_edited_adapter_is_refused(edit, kept, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(kept / "run", run)
    adapter = run / "adapter"
    if edit == "lora_alpha":
        config = json.loads((adapter / "adapter_config.json").read_text())
        config["lora_alpha"] *= 4
        (adapter / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")  # same size
        needle = "adapter_config.json: checksum mismatch"
    elif edit == "flipped-weight-byte":
        weights = bytearray((adapter / "adapter_model.safetensors").read_bytes())
        weights[-3] ^= 0x40
        (adapter / "adapter_model.safetensors").write_bytes(bytes(weights))
        needle = "adapter_model.safetensors: checksum mismatch"
    else:
        manifest = json.loads((adapter / "modulora_adapter.json").read_text())
        manifest["files"]["adapter_config.json"]["sha256"] = "0" * 64
        (adapter / "modulora_adapter.json").write_text(json.dumps(manifest))
        needle = "modulora_adapter.json: edited or corrupt"
    capsys.readouterr()
    assert evaluate(run) == 2
    assert needle in one_error_line(capsys)


@pytest.mark.parametrize("field,value", [("group_size", 64), ("symmetric", True)])
def test_edited_quantizer_setting_is_refused(field, value, kept, tmp_path, capsys):
    q = tmp_path / "q4"
    shutil.copytree(kept / "q4", q)
    manifest = json.loads((q / "modulora.json").read_text())
    manifest["quantizer"][field] = value
    for layer in manifest["layers"].values():
        if field in layer.get("config", layer):
            layer.get("config", layer)[field] = value
    (q / "modulora.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert evaluate(q) == 2
    assert "modulora.json: edited or corrupt (it does not match its own checksum)" in one_error_line(capsys)


@pytest.mark.parametrize("command", ["export", "correct", "quantize"])
def test_output_over_an_input_is_refused(command, kept, tmp_path, capsys):
    q = tmp_path / "q4"
    shutil.copytree(kept / "q4", q)
    shutil.copyfile(GGUF_MODEL, q / "m.gguf")
    args = {
        "export": ["export", kept / "run", "--out", kept / "run"],
        "correct": ["correct", q, "--calib", TRAIN_TXT, "--steps", 1, "--out", q],
        "quantize": ["quantize", q / "m.gguf", "--method", "rtn", "--out", q],  # an output holding its input
    }[command]
    before = {p: p.read_bytes() for p in sorted(q.rglob("*")) if p.is_file()}
    capsys.readouterr()
    assert modulora(*args) == 2
    assert "would overwrite the input" in one_error_line(capsys)
    assert {p: p.read_bytes() for p in sorted(q.rglob("*")) if p.is_file()} == before


def test_a_run_folder_belongs_to_one_run(kept, tmp_path, capsys):
    """A second finetune into a run folder is refused unless --overwrite; --resume with a changed setting is
    refused (naming it) unless --force; --resume with more steps is fine."""
    run = tmp_path / "run"
    shutil.copytree(kept / "run", run)
    base = ["finetune", kept / "q4", "--data", TRAIN_TXT, "--seq-len", 64, "--limit", 8, "--batch-size", 4,
            "--save-every", 1, "--out", run]
    capsys.readouterr()
    assert modulora(*base, "--steps", 2) == 2
    assert "holds a run already; --resume continues it, --overwrite deletes it" in one_error_line(capsys)
    assert modulora(*base, "--steps", 2, "--overwrite") == 0  # starts again (and now saves checkpoints)
    capsys.readouterr()
    assert modulora(*base, "--steps", 3, "--resume", "--lr", "0.01") == 2
    assert "--resume with settings that differ from the run's: train.lr (0.003 -> 0.01)" in one_error_line(capsys)
    assert modulora(*base, "--steps", 3, "--resume") == 0
    assert modulora(*base, "--steps", 4, "--resume", "--lr", "0.01", "--force") == 0
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_an_adapter_on_a_replaced_base_is_refused(kept, tmp_path, capsys):
    """The base directory an adapter was trained on, re-quantized in place (another bit width; refused without
    --overwrite): the run refuses to load rather than put the adapter on weights it was not trained for."""
    q, run = tmp_path / "q4", tmp_path / "run"
    shutil.copytree(kept / "q4", q)
    assert modulora("finetune", q, "--data", TRAIN_TXT, "--steps", 1, "--seq-len", 64, "--limit", 4,
                    "--batch-size", 4, "--save-every", 0, "--out", run) == 0
    assert evaluate(run) == 0
    capsys.readouterr()
    assert modulora("quantize", GGUF_MODEL, "--method", "rtn", "--bits", 3, "--out", q) == 2
    assert f"{q}: exists and is not empty; --overwrite replaces it" in one_error_line(capsys)
    assert modulora("quantize", GGUF_MODEL, "--method", "rtn", "--bits", 3, "--out", q, "--overwrite") == 0
    capsys.readouterr()
    assert evaluate(run) == 2
    assert "trained on another model than the one now at" in one_error_line(capsys)


def test_a_directory_is_hashed_once_per_process_until_a_file_changes(kept, tmp_path, monkeypatch, capsys):
    """Reading a quantized directory's manifest again (a command does it several times) hashes nothing new; a file
    rewritten since is hashed again and, altered, refused."""
    import time

    import engine.storage as storage
    from engine.model import read_manifest

    q = tmp_path / "q4"
    shutil.copytree(kept / "q4", q)
    hashed: list[Path] = []
    real = storage.sha256_file
    monkeypatch.setattr(storage, "sha256_file", lambda path, *a: hashed.append(Path(path)) or real(path, *a))
    files = read_manifest(q)["files"]
    assert sorted(p.name for p in hashed) == sorted(Path(n).name for n in files)
    hashed.clear()
    read_manifest(q)
    assert hashed == []
    time.sleep(0.05)  # past the file system's timestamp tick
    block = q / "blocks" / "block_00000.safetensors"
    data = bytearray(block.read_bytes())
    data[-1] ^= 1
    block.write_bytes(bytes(data))
    with pytest.raises(EngineError, match="block_00000.safetensors: checksum mismatch"):
        read_manifest(q)
    assert hashed == [block]
