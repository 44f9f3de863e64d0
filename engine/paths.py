"""Where shared models and data live (``MODULORA_SHARED``, default ``../shared`` beside the repo)."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def shared_dir() -> Path:
    """Directory holding the shared models and datasets."""
    return Path(os.environ.get("MODULORA_SHARED", REPO_ROOT.parent / "shared")).resolve()
