"""GRPO-style RL: rollouts through the deployment, group-relative advantages, and a
custom objective through ``forward_backward_custom`` with an optional KL penalty to a
frozen reference.

On-policy: each step snapshots the policy and syncs it to the deployment before the
rollouts, so the ledger shows which weights produced every rollout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from runner.recipes.base import (Recipe, RecipeSettings, StepContext, optim_metrics, visible_text, weighted_datum,
                                 weights_of)
from runner.tasks import Example, grade

if TYPE_CHECKING:
    from fireworks.training.sdk import Datum, SampledCompletion

    from runner.spec import KeyCheck


@dataclass(frozen=True)
class Settings(RecipeSettings):
    group_size: int = 4  # rollouts per prompt
    max_tokens: int = 16  # rollout length
    temperature: float = 1.0  # rollout temperature
    kl_coef: float = 0.0  # weight of the KL penalty to a frozen reference

    def check(self, bad: KeyCheck) -> None:
        bad.at_least("recipe.group_size", self.group_size)
        bad.at_least("recipe.max_tokens", self.max_tokens)
        bad.not_negative("recipe.temperature", self.temperature)
        bad.not_negative("recipe.kl_coef", self.kl_coef)
        bad.completions_per_request("recipe.group_size", self.group_size,
                                    "rollouts per prompt are one completions request's n")
        bad.new_tokens("recipe.max_tokens", self.max_tokens)

    def needs_reference(self) -> bool:
        """A frozen reference only when the objective has a KL term."""
        return self.kl_coef > 0

    def new_tokens(self) -> int:
        return self.max_tokens

    def rollouts_per_prompt(self) -> int | None:
        return self.group_size


def group_advantages(rewards: list[float]) -> list[float]:
    """Each rollout's reward minus its group's mean reward (the group: one prompt's rollouts)."""
    mean = sum(rewards) / len(rewards) if rewards else 0.0
    return [r - mean for r in rewards]


NO_COMPLETION = "no rollout has a completion: nothing to train on, no optimizer step ran"


def train_step(ctx: StepContext, batch: list[Example]) -> dict[str, float]:
    # the weights hold the steps before this one: an eval of this step must sync its own
    sampler = ctx.sync_policy(f"rollout-{ctx.step}", trained_through=ctx.step - 1)
    settings: Settings = ctx.settings

    async def rollouts() -> list[list[SampledCompletion]]:
        import asyncio

        return await asyncio.gather(*(sampler.sample_with_tokens(
            messages=ex.chat(), n=settings.group_size, max_tokens=settings.max_tokens,
            temperature=settings.temperature) for ex in batch))

    groups = ctx.run_async(rollouts())
    data, masks, advantages, rewards = [], [], [], []
    for ex, group in zip(batch, groups):
        rs = [grade(ex.answer, visible_text(ctx.tokenizer, c.text)) for c in group]  # as the evals grade
        for c, r, a in zip(group, rs, group_advantages(rs)):
            if c.completion_len == 0:
                continue
            d = weighted_datum(list(c.full_tokens), c.prompt_len)
            data.append(d)
            masks.append(weights_of(d))
            advantages.append(a)
            rewards.append(r)
    if not data:
        return ctx.skip(NO_COMPLETION, {"rollouts": 0.0})

    return {"reward": sum(rewards) / len(rewards), **policy_gradient(ctx, data, masks, advantages)}


def policy_gradient(ctx: StepContext, data: list[Datum], masks: list[torch.Tensor],
                    advantages: list[float | torch.Tensor]) -> dict[str, float]:
    """One optimizer step on ``-advantage * log-prob`` over each datum's masked tokens (an
    advantage per sequence, or per token: a tensor the datum's length), plus the KL penalty
    to the frozen reference when there is one; the loss and optimizer metrics."""
    settings: Settings = ctx.settings
    ref_logprobs = None
    if ctx.reference is not None:
        ref_logprobs = [o["logprobs"].to_torch() for o in ctx.reference.forward(data, "cross_entropy").result().loss_fn_outputs]
    n_tokens = float(sum(m.sum() for m in masks)) or 1.0

    def objective(_data: list[Datum], logprobs: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        pg = sum(-(a * lp * m).sum() for a, lp, m in zip(advantages, logprobs, masks)) / n_tokens
        kl = torch.zeros(())
        if ref_logprobs is not None:
            kl = sum(((lp - r.detach()) * m).sum() for lp, r, m in zip(logprobs, ref_logprobs, masks)) / n_tokens
        loss = pg + settings.kl_coef * kl
        return loss, {"pg_loss": float(pg.detach()), "kl": float(kl.detach())}

    out = ctx.policy.forward_backward_custom(data, objective).result()
    opt = ctx.policy.optim_step(ctx.adam).result()
    metrics = {"rollouts": float(len(data))}
    if "loss:sum" in (out.metrics or {}):  # what the trainer did not report is left out, not zeroed
        metrics["loss"] = float(out.metrics["loss:sum"])
    metrics.update({k: float(v) for k, v in (out.metrics or {}).items() if isinstance(v, (int, float))})
    metrics.update(optim_metrics(opt))
    return metrics


RECIPE = Recipe("grpo", train_step, Settings)
