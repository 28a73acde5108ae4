"""Direct Preference Optimization: raise the policy's log-likelihood ratio of the chosen
answer over the rejected one, measured against a frozen reference.

For a pair, with sequence log-probabilities (summed over the answer tokens) under the
policy (pi) and the reference (ref), the implicit reward of an answer is
``beta * (pi - ref)`` and the loss is ``-log sigmoid(reward_chosen - reward_rejected)``.
The reference comes from ``create_reference_client``: a separate frozen trainer for a
full-parameter policy, the policy's own session with its adapters disabled for LoRA.

Reference log-probabilities never change, so they are cached per pair (keyed by the
pair's tokens), as the cookbook's DPO loop caches them per example: a pair seen again
(a JSONL set's next epoch) costs no reference call. Each pair's reference forward is a
call of its own, so its values do not depend on what else was in flight: the cache a
resumed run rebuilds holds exactly the values the crashed attempt's held.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from runner.recipes.base import PAIRS, Recipe, RecipeSettings, StepContext, answer_datum, step_on_pairs, weights_of
from runner.tasks.preference import Pair

if TYPE_CHECKING:
    from fireworks.training.sdk import Datum, FiretitanTrainingClient

    from runner.spec import KeyCheck
    from runner.tokenizer import Tokenizer

__all__ = ["RECIPE", "Settings", "train_step", "pair_data", "sequence_logprob"]


@dataclass(frozen=True)
class Settings(RecipeSettings):
    beta: float = 0.1  # scale of the implicit reward

    def check(self, bad: KeyCheck) -> None:
        if self.beta <= 0:
            raise bad("recipe.beta", f"must be positive, got {self.beta}")

    def needs_reference(self) -> bool:
        return True


def pair_data(tokenizer: Tokenizer, pair: Pair) -> tuple[Datum, Datum]:
    """The chosen and the rejected datum: the same prompt, each weighted on its answer only."""
    return answer_datum(tokenizer, pair.prompt, pair.chosen), answer_datum(tokenizer, pair.prompt, pair.rejected)


def sequence_logprob(logprobs: torch.Tensor, datum: Datum) -> torch.Tensor:
    """log p(answer | prompt): the per-token log-probabilities summed over the answer."""
    return (logprobs * weights_of(datum)).sum()


class ReferenceCache:
    """Reference log-probabilities of (chosen, rejected) per pair, filled on first use."""

    def __init__(self) -> None:
        self._values: dict[str, tuple[float, float]] = {}

    @staticmethod
    def key(chosen: Datum, rejected: Datum) -> str:
        h = hashlib.sha256()
        for d in (chosen, rejected):
            h.update(repr(d.model_input.to_ints()).encode())
            h.update(repr(d.loss_fn_inputs["target_tokens"].to_torch().tolist()).encode())
            h.update(b"|")
        return h.hexdigest()

    def lookup(self, reference: FiretitanTrainingClient, data: list[tuple[Datum, Datum]]) -> list[tuple[float, float]]:
        keys = [self.key(c, r) for c, r in data]
        missing = {k: (c, r) for k, (c, r) in zip(keys, data) if k not in self._values}
        # one forward per pair, all in flight at once: a pair's values never depend on its neighbours
        futures = {k: reference.forward([c, r], "cross_entropy") for k, (c, r) in missing.items()}
        for k, future in futures.items():
            c, r = missing[k]
            out = future.result().loss_fn_outputs
            self._values[k] = (float(sequence_logprob(out[0]["logprobs"].to_torch(), c)),
                               float(sequence_logprob(out[1]["logprobs"].to_torch(), r)))
        return [self._values[k] for k in keys]

    def __len__(self) -> int:
        return len(self._values)


def _cache(ctx: StepContext) -> ReferenceCache:
    # one cache per run attempt, kept on the context the loop hands every step
    cache: ReferenceCache = ctx.memo.setdefault("reference_cache", ReferenceCache())
    return cache


def train_step(ctx: StepContext, batch: list[Pair]) -> dict[str, float]:
    """One optimizer step over the batch's pairs, accumulated over the micro-batches."""
    if ctx.reference is None:
        raise RuntimeError("DPO needs a frozen reference client; the run provisioned none")
    beta = ctx.settings.beta
    data = [pair_data(ctx.tokenizer, p) for p in batch]
    refs = _cache(ctx).lookup(ctx.reference, data)

    def pair_loss(lp_c: list[torch.Tensor], lp_r: list[torch.Tensor], d_c: list[Datum], d_r: list[Datum],
                  ref: list[tuple[float, float]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        pi_c = torch.stack([sequence_logprob(lp, d) for lp, d in zip(lp_c, d_c)])
        pi_r = torch.stack([sequence_logprob(lp, d) for lp, d in zip(lp_r, d_r)])
        reward_c = beta * (pi_c - torch.tensor([c for c, _ in ref]))
        reward_r = beta * (pi_r - torch.tensor([r for _, r in ref]))
        margin = reward_c - reward_r
        loss = -F.logsigmoid(margin).mean()
        return loss, {"loss": loss, "margin": margin.mean(), "accuracy": (margin > 0).float().mean(),
                      "chosen_reward": reward_c.mean(), "rejected_reward": reward_r.mean()}

    return step_on_pairs(ctx, list(zip(data, refs)), pair_loss)


RECIPE = Recipe("dpo", train_step, Settings, PAIRS)  # preference pairs, not single examples
