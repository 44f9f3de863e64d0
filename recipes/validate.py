"""Strict reading of YAML: every value checked and converted where it is read.

A config is described by nested ``{key: (converter, default)}`` tables (the
recipe schema makes them from the specs' declared settings).  A converter takes
the raw value and its key path (``finetune.lora.rank``) and returns the checked
value or raises one :class:`EngineError` line that names the path, the value and
what was allowed.  An unknown key is refused with the closest valid key
suggested, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine.errors import EngineError
from engine.paths import shared_dir

Convert = Callable[[Any, str], Any]
Keys = dict[str, tuple[Convert, Any]]
REQUIRED = object()  # default of a key that must be given


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def unknown_key(path: str, key: str, allowed: list[str]) -> EngineError:
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.5)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return EngineError(f"{join(path, key)}: unknown key; {hint}allowed: {', '.join(allowed)}")


def section(raw: Any, path: str, keys: Keys) -> dict[str, Any]:
    """``raw`` read as a mapping with exactly ``keys``: values converted, defaults filled in, an unknown
    or missing key refused with its full path.  ``None`` (an empty YAML section) reads as ``{}``."""
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise EngineError(f"{path or 'config'}: expected a mapping, got {type(raw).__name__} {raw!r}"[:300])
    for key in raw:
        if key not in keys:
            raise unknown_key(path, str(key), list(keys))
    out = {}
    for key, (convert, default) in keys.items():
        where = join(path, key)
        if key in raw and raw[key] is not None:
            out[key] = convert(raw[key], where)
        elif default is REQUIRED:
            raise EngineError(f"{where}: missing")
        else:
            out[key] = default
    return out


def mapping(keys: Keys) -> Convert:
    return lambda value, where: section(value, where, keys)


def string(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise EngineError(f"{where}: expected a non-empty string, got {value!r}")
    return value


def choice(allowed: tuple[Any, ...]) -> Convert:
    def convert(value: Any, where: str) -> Any:
        if isinstance(value, bool) or value not in allowed:
            raise EngineError(f"{where}: expected one of {', '.join(map(str, allowed))}, got {value!r}")
        return value

    return convert


def listof(item: Convert) -> Convert:
    """A non-empty list of items (a single value is a list of one)."""

    def convert(value: Any, where: str) -> list[Any]:
        values = value if isinstance(value, list) else [value]
        if not values:
            raise EngineError(f"{where}: empty list")
        return [item(v, f"{where}[{i}]") for i, v in enumerate(values)]

    return convert


def expand(value: str, base: Path) -> Path:
    """A path relative to ``base`` (the config's folder); ``{shared}`` is the shared models and data folder."""
    return (base / value.replace("{shared}", str(shared_dir()))).resolve()


def file(base: Path) -> Convert:
    def convert(value: Any, where: str) -> str:
        path = expand(string(value, where), base)
        if not path.is_file():
            raise EngineError(f"{where}: {path}: no such file")
        return str(path)

    return convert


def model(base: Path) -> Convert:
    """A model path (relative to the config, or under ``{shared}``), else a hub id left as written."""

    def convert(value: Any, where: str) -> str:
        path = expand(string(value, where), base)
        if path.exists():
            return str(path)
        if "{shared}" in value or value.startswith((".", "/", "~")) or value.count("/") > 1 or path.suffix == ".gguf":
            raise EngineError(f"{where}: {path}: no such file or directory (nor a hub id like org/name)")
        return value

    return convert


def load_yaml(config_file: str | Path) -> Any:
    """The parsed YAML of a config file, or one line saying why it cannot be read."""
    import yaml

    config_file = Path(config_file)
    if not config_file.is_file():
        raise EngineError(f"{config_file}: no such file")
    try:
        return yaml.safe_load(config_file.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise EngineError(f"{config_file}: not UTF-8 text") from None
    except yaml.YAMLError as exc:
        first = " ".join(str(exc).split())
        raise EngineError(f"{config_file}: not valid YAML ({first[:200]})") from None
