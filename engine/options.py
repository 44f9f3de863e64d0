"""Typed settings declared once: each with its default, type, bounds and help line.

Specs (``engine.pipelines``), the trainer's settings and every quantizer declare
their settings here with :func:`setting` (or an :class:`Option`).  The command
line, the recipe schema, the sweep grid and validation are all derived from
these declarations, so a setting is added, documented and checked in one place.

A value is checked where it enters (a YAML key, a command-line flag, a spec
built in Python); a bad one is refused with one :class:`SettingError` line that
names where it came from, what it was and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import EngineError

KINDS = ("int", "float", "bool", "str", "file", "data", "path", "model", "map", "size")


class SettingError(EngineError):
    """A bad setting: ``field`` is its dotted path inside the spec (``lora.rank``), so each entry point can
    name it as its user typed it (``--rank`` on the command line, ``finetune.lora.rank`` in a recipe).
    ``problem`` may name other settings as ``{0}``, ``{1}``: the dotted paths in ``refs``."""

    def __init__(self, field: str, problem: str, refs: tuple[str, ...] = ()) -> None:
        self.field, self.problem, self.refs = field, problem, refs
        super().__init__(self.render(lambda path: path))

    def render(self, name_of: Callable[[str], str]) -> str:
        problem = self.problem
        for i, ref in enumerate(self.refs):
            problem = problem.replace(f"{{{i}}}", name_of(ref))
        return f"{name_of(self.field)}: {problem}"

    def under(self, prefix: str) -> SettingError:
        return SettingError(f"{prefix}.{self.field}", self.problem, tuple(f"{prefix}.{ref}" for ref in self.refs))


@dataclass(frozen=True)
class Option:
    """One setting: its kind (one of ``KINDS``), default, bounds or choices, and the help line users see.

    ``optional`` lets ``None`` through (an unset value with a derived meaning, e.g. alpha = 2 x rank);
    ``many`` takes a non-empty list of such values (a tuple); ``flag`` is its command-line name when that is
    not ``--field-name``.
    """

    kind: str
    default: Any = None
    help: str = ""
    minimum: float | None = None
    maximum: float | None = None
    above: bool = False  # the minimum is exclusive
    choices: tuple[Any, ...] | None = None
    optional: bool = False
    many: bool = False
    flag: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown option kind {self.kind!r}")

    def allowed(self) -> str:
        """What the option takes, as the error messages and the help say it."""
        if self.choices is not None:
            return f"one of {', '.join(map(str, self.choices))}"
        if self.kind == "bool":
            return "true or false"
        if self.kind == "size":
            return "a size such as 24GiB, 64GB, 512MiB or a byte count"
        noun = {"int": "an integer", "float": "a number"}.get(self.kind)
        if noun is None:
            return "a non-empty string" if self.kind != "map" else "a mapping of names to strings"
        low = None if self.minimum is None else f"{'>' if self.above else '>='} {self.minimum:g}"
        high = None if self.maximum is None else f"<= {self.maximum:g}"
        if self.kind == "int" and low and high:
            return f"{noun} between {self.minimum:g} and {self.maximum:g}"
        return " ".join([noun, " and ".join(b for b in (low, high) if b)]).strip()

    def check(self, value: Any, where: str) -> Any:
        """``value`` converted to this option's kind, or a :class:`SettingError` naming ``where``."""
        if value is None:
            if self.optional:
                return None
            raise SettingError(where, "missing")
        if self.many:
            values = value if isinstance(value, (list, tuple)) else [value]
            if not values:
                raise SettingError(where, "empty list")
            return tuple(dataclasses.replace(self, many=False).check(v, f"{where}[{i}]") for i, v in enumerate(values))
        checked = self._convert(value)
        if checked is _BAD:
            raise SettingError(where, f"expected {self.allowed()}, got {value!r}"[:300])
        return checked

    def _convert(self, value: Any) -> Any:
        if self.choices is not None:
            ok = value in self.choices and (isinstance(value, bool) == (self.kind == "bool"))
            return value if ok else _BAD
        if self.kind == "bool":
            return value if isinstance(value, bool) else _BAD
        if self.kind == "int":
            return value if _is_int(value) and self._in_range(value) else _BAD
        if self.kind == "float":
            number = _number(value)
            return number if number is not None and self._in_range(number) else _BAD
        if self.kind == "map":
            ok = isinstance(value, Mapping) and all(isinstance(v, str) and v for v in value.values())
            return {str(k): v for k, v in value.items()} if ok else _BAD
        if self.kind == "size":
            size = value if _is_int(value) and value >= 0 else parse_size(value) if isinstance(value, str) else None
            return _BAD if size is None else size
        if isinstance(value, Path):
            value = str(value)
        return value if isinstance(value, str) and value else _BAD

    def _in_range(self, x: float) -> bool:
        if self.minimum is not None and (x <= self.minimum if self.above else x < self.minimum):
            return False
        return self.maximum is None or x <= self.maximum


_BAD = object()
UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_size(text: str) -> int | None:
    """Bytes from ``24GiB``, ``64GB``, ``512MiB``, ``1.5 TiB`` or a plain byte count; None if unreadable."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match and UNITS.get(match.group(2).lower())
    return int(float(match.group(1)) * unit) if unit else None


def format_size(nbytes: float) -> str:
    if nbytes >= 1000 * (1 << 20):
        return f"{nbytes / (1 << 30):.2f} GiB"
    return f"{nbytes / (1 << 20):.1f} MiB" if nbytes >= 1 << 20 else f"{nbytes / (1 << 10):.1f} KiB"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> float | None:
    """A finite float from a number or a numeric string (YAML reads ``3e-3``, without a dot, as a string)."""
    if isinstance(value, bool):
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


# --------------------------------------------------------------------------------------------------
# Settings of dataclasses


def setting(default: Any = dataclasses.MISSING, kind: str = "str", help: str = "", **constraints: Any) -> Any:
    """A dataclass field declared as an :class:`Option` (the field's default is the option's default).
    Omit ``default`` for a required setting; mutable defaults (maps, lists) are copied per instance."""
    option = Option(kind, None if default is dataclasses.MISSING else default, help, **constraints)
    metadata = {"option": option}
    if isinstance(default, (dict, list)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def option_of(field: dataclasses.Field) -> Option | None:
    return field.metadata.get("option")


def spec_type(owner: type, field: dataclasses.Field) -> type | None:
    """The spec class a field holds (``data: DataSpec``, ``calib: CalibSpec | None``), else None."""
    hint = typing.get_type_hints(owner)[field.name]
    if isinstance(hint, types.UnionType):
        inner = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        hint = inner[0] if len(inner) == 1 else None
    return hint if isinstance(hint, type) and dataclasses.is_dataclass(hint) else None


def default_of(owner: type, name: str) -> Any:
    """The declared default of setting ``name`` of ``owner``: for a setting that follows another's default."""
    field = next(f for f in dataclasses.fields(owner) if f.name == name)
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


class Spec:
    """Base of the typed specs: every declared setting is checked when the spec is made, then ``validate``
    checks the combinations.  Specs are frozen dataclasses; ``dataclasses.replace`` makes a changed copy,
    checked again."""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            option = option_of(field)
            if option is not None:
                object.__setattr__(self, field.name, option.check(getattr(self, field.name), field.name))
        self.validate()

    def validate(self) -> None:
        """Rules across settings; raise :class:`SettingError` naming the setting to change."""


def build(cls: type, values: Mapping[str, Any]) -> Any:
    """``cls`` made from a nested mapping: values of spec-typed fields that are mappings become those
    specs; an error inside one is named by its full path (``lora.rank``)."""
    kwargs = {}
    for field in dataclasses.fields(cls):
        if field.name not in values:
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise SettingError(field.name, "missing")
            continue
        value, inner = values[field.name], spec_type(cls, field)
        if inner is not None and isinstance(value, Mapping):
            try:
                value = build(inner, value)
            except SettingError as exc:
                raise exc.under(field.name) from None
        kwargs[field.name] = value
    unknown = set(values) - set(kwargs)
    if unknown:
        raise SettingError(sorted(unknown)[0], f"not a setting of {cls.__name__}")
    return cls(**kwargs)


def as_plain(spec: Any) -> Any:
    """A spec as JSON-able plain data (tuples as lists), for records and fingerprints."""
    return _plain(dataclasses.asdict(spec))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
