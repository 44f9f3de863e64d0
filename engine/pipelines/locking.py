"""Use cases hold their output folders: one writer per folder (:func:`engine.storage.output_lock`), and no output
that is, or holds, one of the use case's inputs."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from engine.errors import EngineError
from engine.storage import output_locks

UseCase = TypeVar("UseCase", bound=Callable[..., Any])
Paths = Callable[[Any], tuple[str | None, ...]]


def check_apart(outputs: tuple[str | None, ...], inputs: tuple[str | None, ...]) -> None:
    """Refuse an output folder that equals or contains an input: writing it would destroy what is being read."""
    for out in (Path(o).resolve() for o in outputs if o is not None):
        for given in (i for i in inputs if i is not None):
            source = Path(given).resolve()
            if Path(given).exists() and (source == out or out in source.parents):
                raise EngineError(f"--out {out}: would overwrite the input {given}; choose another output")


def holding_outputs(outputs: Paths, inputs: Paths = lambda spec: ()) -> Callable[[UseCase], UseCase]:
    """Run the decorated use case (its first argument is the spec) with the folders ``outputs(spec)`` locked,
    after checking that none of them is or holds one of ``inputs(spec)``."""

    def decorate(use_case: UseCase) -> UseCase:
        @functools.wraps(use_case)
        def run(spec: Any, *args: Any, **kwargs: Any) -> Any:
            check_apart(outputs(spec), inputs(spec))
            with output_locks(*outputs(spec)):
                return use_case(spec, *args, **kwargs)

        return run  # type: ignore[return-value]

    return decorate
