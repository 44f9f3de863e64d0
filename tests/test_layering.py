"""The layering contract (``[tool.importlinter]`` in pyproject.toml) holds, and breaks on a forbidden import."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT = Path(sys.executable).parent / "lint-imports"


def lint(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT), "--no-cache", "--config", str(root / "pyproject.toml")], cwd=root,
                          capture_output=True, text=True, timeout=300, env=os.environ | {"PYTHONPATH": str(root)})


@pytest.mark.slow
def test_the_layering_contract_holds():
    done = lint(ROOT)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "0 broken" in done.stdout


@pytest.mark.slow
@pytest.mark.parametrize(("module", "line", "broken"), [
    ("engine/quant/rtn.py", "from engine.model import quantize_model", "engine.quant is not allowed to import engine.model"),
    ("engine/model/quantize.py", "from engine.pipelines import quantize", "engine.model is not allowed to import "
     "engine.pipelines"),
    ("engine/pipelines/finetuning.py", "import engine.cli", "engine.pipelines is not allowed to import engine.cli"),
    ("engine/train/trainer.py", "import recipes.schema", "engine.train is not allowed to import recipes"),
    ("cluster/sweep/trial.py", "from engine.model.sequential import ShardRunner",
     "cluster is not allowed to import engine.model.sequential"),
])
def test_a_forbidden_import_breaks_it(tmp_path, module, line, broken):
    for package in ("engine", "cluster", "recipes"):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    target = tmp_path / module
    target.write_text(target.read_text().replace("from __future__ import annotations\n",
                                                 f"from __future__ import annotations\n\n{line}  # noqa\n", 1))
    done = lint(tmp_path)
    assert done.returncode == 1 and broken in done.stdout, done.stdout[-3000:]
