"""Every typed option of every command, given values it must refuse: one ``modulora: error:`` line, exit code 2,
nothing written.  The cases are generated from the commands themselves, so a new option is covered when added."""

from __future__ import annotations


import click
import pytest

from conftest import GGUF_MODEL, TRAIN_TXT, VALID_TXT, modulora

BAD = {  # click parameter type -> values no option of that type may accept
    "IntParamType": ["abc", "1.5"],
    "IntRange": ["abc", "1.5"],
    "FloatParamType": ["abc", "nan", "inf", "-inf"],
    "Choice": ["bogus"],
    "Path": ["/no/such/file.txt"],
}
BASE = {  # command -> arguments that are valid, and cheap if a case were (wrongly) accepted
    "quantize": [GGUF_MODEL, "--method", "rtn", "--out", "OUT"],
    "calibrate": [GGUF_MODEL, "--method", "optq", "--calib", TRAIN_TXT, "--calib-windows", 2, "--calib-seq-len", 32,
                  "--out", "OUT"],
    "correct": ["OUT-input", "--calib", TRAIN_TXT, "--steps", 1, "--out", "OUT"],
    "finetune": [GGUF_MODEL, "--data", TRAIN_TXT, "--steps", 1, "--limit", 4, "--seq-len", 32, "--batch-size", 2,
                 "--out", "OUT"],
    "eval": [GGUF_MODEL, "--data", VALID_TXT, "--limit", 2, "--seq-len", 32],
    "export": ["OUT-input", "--out", "OUT"],
    "plan": ["--model", "llama-7b", "--host-mem", "24GiB", "--device", "cpu"],
}


def cases() -> list[tuple[str, str, str]]:
    from engine.cli import add_plugin_commands, cli

    add_plugin_commands()
    found = []
    for command, base in BASE.items():
        for param in cli.commands[command].params:
            kind = type(param.type).__name__
            if isinstance(param, click.Option) and not param.is_flag and kind in BAD:
                found += [(command, param.opts[-1], value) for value in BAD[kind]]
    return found


CASES = cases()


def test_enough_cases():
    assert len(CASES) >= 150


@pytest.mark.parametrize(("command", "option", "value"), CASES, ids=[f"{c}{o}={v}" for c, o, v in CASES])
def test_bad_value_is_one_line_exit_2(command, option, value, tmp_path, capsys):
    args = [str(a).replace("OUT", str(tmp_path / "out")) for a in BASE[command]]
    code = modulora(command, *args, option, value)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err[-2000:]
    assert len(lines) == 1 and lines[0].startswith("modulora: error: "), err[-2000:]
    assert not (tmp_path / "out").exists()


SIZES = [  # (command, option, value, what the line says): sizes the model or the data cannot take
    ("eval", "--seq-len", 4096, "longer than the model's context of 2048 tokens"),
    ("finetune", "--seq-len", 4096, "longer than the model's context of 2048 tokens"),
    ("calibrate", "--calib-seq-len", 4096, "longer than the model's context of 2048 tokens"),
    ("correct", "--seq-len", 4096, "longer than the model's context of 2048 tokens"),
    ("calibrate", "--calib-windows", 1_000_000, "fewer than the 1000000 asked for"),
    ("calibrate", "--distill-windows", 1_000_000, "fewer than the 1000000 asked for"),  # before any rounding
    ("finetune", "--workers", 3, "--batch-size: 2 must split evenly among the --workers (3)"),
]


@pytest.mark.parametrize(("command", "option", "value", "says"), SIZES, ids=[f"{c}{o}={v}" for c, o, v, _ in SIZES])
def test_size_beyond_the_model_or_data_is_one_line_exit_2(command, option, value, says, tmp_path, capsys):
    """Such sizes used to run for minutes (attention over 100000 tokens, a million calibration windows)."""
    if command == "correct":
        assert modulora("quantize", GGUF_MODEL, "--method", "rtn", "--bits", 4, "--out", tmp_path / "out-input") == 0
        capsys.readouterr()
    args = [str(a).replace("OUT", str(tmp_path / "out")) for a in BASE[command]]
    code = modulora(command, *args, option, value)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("modulora: error: "), lines
    assert says in lines[0]
    assert not (tmp_path / "out").exists()
