"""Use cases hold their output folders: one writer per folder (:func:`engine.storage.output_lock`)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

from engine.storage import output_locks

UseCase = TypeVar("UseCase", bound=Callable[..., Any])


def holding_outputs(outputs: Callable[[Any], tuple[str | None, ...]]) -> Callable[[UseCase], UseCase]:
    """Run the decorated use case with the folders ``outputs(spec)`` names locked (its first argument is the spec)."""

    def decorate(use_case: UseCase) -> UseCase:
        @functools.wraps(use_case)
        def run(spec: Any, *args: Any, **kwargs: Any) -> Any:
            with output_locks(*outputs(spec)):
                return use_case(spec, *args, **kwargs)

        return run  # type: ignore[return-value]

    return decorate
