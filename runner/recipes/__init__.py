"""Recipes: what one training step does. Each is a module of this package that defines
``RECIPE = Recipe(...)`` (see runner.recipes.base); the registry below is found from those
modules, and a spec's ``recipe.kind`` is one of its keys. Adding a recipe is adding a module."""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import typing
from typing import Any

from runner.recipes.base import Recipe, StepContext

__all__ = ["RECIPES", "SETTINGS_KEYS", "Recipe", "StepContext", "discover"]

# How messages and a recorded [recipe] table list the recipes: these first, in the order they
# were added, then any other in name order. Only the order: a recipe need not be named here.
_LISTED_FIRST = ("sft", "grpo", "dpo", "orpo", "async_grpo", "igpo")


def discover() -> dict[str, Recipe]:
    """kind -> Recipe, for every module of this package that defines RECIPE."""
    found: dict[str, Recipe] = {}
    for module in pkgutil.iter_modules(__path__):
        recipe = getattr(importlib.import_module(f"{__name__}.{module.name}"), "RECIPE", None)
        if recipe is None:
            continue
        if recipe.kind in found:
            raise TypeError(f"recipe kind {recipe.kind!r} is defined twice (runner.recipes.{module.name})")
        found[recipe.kind] = recipe
    listed = sorted(found, key=lambda kind: (_LISTED_FIRST.index(kind) if kind in _LISTED_FIRST
                                             else len(_LISTED_FIRST), kind))
    return {kind: found[kind] for kind in listed}


# a key's (type, default) is Any: its type a typing form (int, float | None, a Literal) that the
# spec's coercion reads, its default a value of that type
def settings_keys(recipes: dict[str, Recipe]) -> dict[str, tuple[Any, Any]]:
    """Every recipe's keys of [recipe] -> (type, default), in the recipes' order. A key that
    two recipes declare must mean one thing: the same type and default in both."""
    keys: dict[str, tuple[Any, Any]] = {}
    for recipe in recipes.values():
        hints = typing.get_type_hints(recipe.settings)
        for f in dataclasses.fields(recipe.settings):
            if f.default is dataclasses.MISSING:  # a spec that leaves the key out must still mean something
                raise TypeError(f"recipe {recipe.kind!r}: recipe.{f.name} has no default")
            declared = (hints[f.name], f.default)
            if keys.setdefault(f.name, declared) != declared:
                raise TypeError(f"recipe {recipe.kind!r} declares recipe.{f.name} as {declared}, another "
                                f"recipe as {keys[f.name]}: a [recipe] key means one thing")
    return keys


RECIPES: dict[str, Recipe] = discover()
SETTINGS_KEYS: dict[str, tuple[Any, Any]] = settings_keys(RECIPES)
