"""Recipes: what one training step does. Each is a module with ``needs_reference(spec)``
and ``train_step(ctx, batch) -> metrics`` (see runner.recipes.base). Preference recipes
(``takes_pairs = True``) get runner.tasks.preference pairs as their batch."""

from runner.recipes import async_grpo, dpo, grpo, igpo, orpo, sft
from runner.recipes.base import Recipe, StepContext

# igpo is multi-turn: it also plays its own eval episodes (play_eval)
RECIPES: dict[str, Recipe] = {"sft": sft, "grpo": grpo, "dpo": dpo, "orpo": orpo,
                              "async_grpo": async_grpo, "igpo": igpo}

__all__ = ["RECIPES", "Recipe", "StepContext"]
