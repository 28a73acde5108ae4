"""Recipes: what one training step does. Each exposes ``train_step(ctx, batch) -> metrics``."""

from runner.recipes import grpo, sft

RECIPES = {"sft": sft, "grpo": grpo}

__all__ = ["RECIPES"]
