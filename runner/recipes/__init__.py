"""Recipes: what one training step does. Each is a module with ``needs_reference(spec)``
and ``train_step(ctx, batch) -> metrics`` (see runner.recipes.base)."""

from runner.recipes import grpo, sft
from runner.recipes.base import Recipe, StepContext

RECIPES: dict[str, Recipe] = {"sft": sft, "grpo": grpo}

__all__ = ["RECIPES", "Recipe", "StepContext"]
