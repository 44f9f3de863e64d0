"""Hub model ids: read from the local cache or downloaded; when the hub is out of reach, one line naming the id.

Kept free of torch and transformers so the console script can check a model id before importing them (seconds):
an id the hub cannot give, with ``HF_HUB_OFFLINE=1`` or no network, fails at once instead of after the imports.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from engine.errors import EngineError

PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model"]  # what a model's loading reads


def is_hub_id(source: str) -> bool:
    """``owner/name`` that is not a local path."""
    return not Path(source).exists() and not source.startswith((".", "/", "~")) and source.count("/") == 1


def hub_snapshot(repo_id: str, local_only: bool = False) -> Path:
    """The local folder of ``repo_id``'s model files (downloaded unless ``local_only`` or offline)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=PATTERNS, local_files_only=local_only))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        raise EngineError(f"{repo_id}: not a local path, and the hub copy could not be had "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0][:160]})") from None


def hub_out_of_reach() -> str | None:
    """Why the hub cannot be reached now (``None``: it may be): ``HF_HUB_OFFLINE``, or its host does not resolve."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "on", "yes", "true"):
        return "HF_HUB_OFFLINE is set"
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError as exc:
        return f"{host} does not resolve: {exc.strerror or exc}"
    return None


def check_hub_id(source: str) -> None:
    """Refuse a hub id the hub cannot give now and the local cache does not hold, in one line."""
    if not is_hub_id(source):
        return
    reason = hub_out_of_reach()
    if reason is None:
        return
    try:
        hub_snapshot(source, local_only=True)
    except EngineError:
        raise EngineError(f"{source}: not a local path, and the hub is out of reach ({reason}) with no copy of it in "
                          "the local cache; download it where there is network, or pass a local path") from None
