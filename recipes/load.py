"""A recipe read, its stages' specs made and their combinations checked: nothing runs on a recipe that would
fail later."""

from __future__ import annotations

from pathlib import Path

from recipes.checks import check_recipe
from recipes.schema import Recipe, read_recipe


def load_recipe(recipe_file: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a recipe; any problem is one EngineError line naming the key path."""
    recipe = read_recipe(recipe_file, overrides)
    check_recipe(recipe)
    return recipe
