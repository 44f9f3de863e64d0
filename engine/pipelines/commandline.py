"""Command-line options made from the specs' declared settings, and specs made from what was parsed.

Every command (``engine.cli``, and the commands ``cluster`` and ``recipes``
plug in) lists its spec's flags with :func:`options` and turns the parsed
values back into the spec with :func:`spec_from`.  Flags default to "not
given", so a spec's own defaults apply (the help shows them); a bad value is
refused with one line naming its flag.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import click

from engine.errors import EngineError
from engine.options import Option, SettingError, build, default_of, option_of, spec_type
from engine.pipelines.specs import QuantizeSpec
from engine.quant import QUANTIZERS, all_options

SEP = "__"  # a nested setting's parameter name: data__seq_len for FinetuneSpec.data.seq_len
Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def flag(name: str, option: Option) -> str:
    return option.flag or "--" + name.replace("_", "-")


def _pairs(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, str] | None:
    out = {}
    for pair in values:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"takes KEY=VALUE, got {pair!r}")
        out[key] = value
    return out or None


def _ints(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"takes comma-separated integers, got {value!r}") from None


def option_args(name: str, option: Option, default: Any, required: bool = False) -> tuple[list[str], dict[str, Any]]:
    """``click.option`` arguments for one setting: unset (None) unless given, the spec's default in the help."""
    text = flag(name.rsplit(SEP, 1)[-1], option)
    shown = not required and default is not None and default not in ({}, ())
    help_text = f"{option.help}  [default: {default}]" if shown else option.help
    common: dict[str, Any] = {"help": help_text, "required": required}
    if option.kind == "bool":  # None unless --x or --no-x is given
        return [f"{text}/--no-{text[2:]}", name], {"default": None, **common}
    if option.kind == "map":
        return [text, name], {"multiple": True, "metavar": "KEY=VALUE", "callback": _pairs, **common}
    if option.many and option.kind == "int":
        return [text, name], {"metavar": "N,N,...", "callback": _ints, **common}
    kind: Any = {"int": int, "float": float}.get(option.kind, str)
    if option.kind == "str" and option.choices:
        kind = click.Choice(option.choices)
    elif option.kind == "file":
        kind = click.Path(exists=True, dir_okay=False)
    return [text, name], {"type": kind, **common}  # no default: click's "not given" is None, a required one missing


def setting_args(
    cls: type, skip: tuple[str, ...] = (), prefix: str = "", optional: bool = False
) -> list[tuple[list[str], dict[str, Any]]]:
    """The flags of every setting of ``cls`` and of the specs inside it, but ``skip`` (dotted paths).  The
    settings of an ``optional`` spec (``calib``) are required only once one of them is given."""
    found = []
    for field in dataclasses.fields(cls):
        path = prefix + field.name
        if path.replace(SEP, ".") in skip:
            continue
        default = default_of(cls, field.name)
        inner = spec_type(cls, field)
        if inner is not None:
            found += setting_args(inner, skip, path + SEP, optional or default is None)
        elif (option := option_of(field)) is not None:
            required = default is dataclasses.MISSING and not optional
            found.append(option_args(path, option, None if default is dataclasses.MISSING else default, required))
    return found


def options(cls: type, skip: tuple[str, ...] = ()) -> Decorator:
    """Decorator: a command takes the flags of ``cls``'s settings (and of the specs inside it)."""
    return _decorate(setting_args(cls, skip))


def _decorate(args: list[tuple[list[str], dict[str, Any]]]) -> Decorator:
    def apply(command: Callable[..., Any]) -> Callable[..., Any]:
        for decls, attrs in reversed(args):
            command = click.option(*decls, **attrs)(command)
        return command

    return apply


def as_params(decorator: Decorator) -> list[click.Parameter]:
    """The parameters a decorator of options gives, for a command built as ``click.Command(params=...)``."""

    def holder() -> None:
        """Only carries the parameters."""

    return list(getattr(decorator(holder), "__click_params__", []))[::-1]


def spec_from(cls: type, given: dict[str, Any], **fixed: Any) -> Any:
    """``cls`` from parsed flags (``given``) and values the command supplies; an error names the flag."""
    nested: dict[str, Any] = {}
    for key, value in {**given, **fixed}.items():
        if value is None:
            continue
        *parents, last = key.split(SEP)
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    try:
        return build(cls, nested)
    except SettingError as exc:  # a value the command supplied is an argument: named as in the usage line
        raise EngineError(exc.render(lambda path: path.upper() if path in fixed else flag_of(cls, path))) from None


def flag_of(cls: type, path: str) -> str:
    """The flag a setting path is given by: a spec's field, a spec inside it (its first flag), or a
    quantizer's setting."""
    owner, parts = cls, path.split("[")[0].split(".")
    for depth, part in enumerate(parts):
        field = next((f for f in dataclasses.fields(owner) if f.name == part), None)
        if field is None:
            break
        inner = spec_type(owner, field)
        if inner is None:
            option = option_of(field)
            return flag(part, option) if option else "--" + part.replace("_", "-")
        owner = inner
        if depth == len(parts) - 1:
            first = dataclasses.fields(inner)[0]
            return flag(first.name, option_of(first))
    return "--" + parts[-1].replace("_", "-")


def command_line(spec: Any) -> list[str]:
    """The flags that make ``spec`` again (the inverse of :func:`spec_from`, for settings with flags)."""
    args = []
    for field in dataclasses.fields(spec):
        value = getattr(spec, field.name)
        if spec_type(type(spec), field) is not None:
            args += command_line(value)
            continue
        option = option_of(field)
        if option is None or value is None:
            continue
        text = flag(field.name, option)
        if option.kind == "bool":
            args.append(text if value else f"--no-{text[2:]}")
        elif option.kind == "size" and value % (1 << 30) == 0:
            args += [text, f"{value >> 30}GiB"]
        elif option.many:
            args += [text, ",".join(map(str, value))]
        else:
            args += [text, f"{value:g}" if isinstance(value, float) else str(value)]
    return args


# --------------------------------------------------------------------------------------------------
# Quantizing: the settings of every method (one spec field, ``options``), and the calibration


def quantizer_args() -> list[tuple[list[str], dict[str, Any]]]:
    """One flag per setting any method takes; each method checks its own, and the help names its defaults."""
    found = []
    for name, option in all_options().items():
        defaults = ", ".join(f"{m}: {cls.options[name].default}" for m, cls in sorted(QUANTIZERS.items())
                             if name in cls.options and cls.options[name].default is not None)
        help_text = f"{option.help} [{defaults}]" if defaults else option.help
        found.append(option_args(name, dataclasses.replace(option, help=help_text), None))
    return found


def quantize_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator: the flags of ``modulora quantize`` (and of ``modulora calibrate``, which adds its workers)."""
    return _decorate([*setting_args(QuantizeSpec, skip=("model", "options")), *quantizer_args()])(command)


def quantize_spec(model: str, given: dict[str, Any]) -> QuantizeSpec:
    """The :class:`QuantizeSpec` of parsed quantize flags: the method's own settings go in ``options``."""
    names = all_options()
    settings = {k: v for k, v in given.items() if k in names and v is not None}
    rest = {k: v for k, v in given.items() if k not in names}
    return spec_from(QuantizeSpec, rest, model=model, options=settings)
