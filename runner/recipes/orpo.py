"""Odds Ratio Preference Optimization: supervised learning of the chosen answer plus a
penalty on the odds ratio of rejected over chosen. No reference model.

With ``avg`` the policy's mean per-token log-probability of an answer and
``odds = avg - log(1 - exp(avg))`` its log-odds, the loss of a pair is
``-avg_chosen + beta * -log sigmoid(odds_chosen - odds_rejected)``. The implicit reward
of an answer (for ``margin`` and ``accuracy``) is ``beta * avg``, as ORPO reports it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from runner.recipes.base import StepContext, chunks, optim_metrics, weights_of
from runner.recipes.dpo import pair_data, sequence_logprob
from runner.spec import Spec
from runner.tasks.preference import Pair

__all__ = ["needs_reference", "train_step"]

takes_pairs = True


def needs_reference(spec: Spec) -> bool:
    return False


def _mean_logprob(logprobs: torch.Tensor, datum: Any) -> torch.Tensor:
    return sequence_logprob(logprobs, datum) / weights_of(datum).sum().clamp(min=1.0)


def _log_odds(avg: torch.Tensor) -> torch.Tensor:
    # log(p / (1 - p)) with log p = avg < 0; expm1 keeps 1 - p accurate when p is near 1
    avg = avg.clamp(max=-1e-6)
    return avg - torch.log(-torch.expm1(avg))


def train_step(ctx: StepContext, batch: list[Pair]) -> dict[str, float]:
    """One optimizer step over the batch's pairs, accumulated over the micro-batches."""
    beta = ctx.spec.recipe.beta
    data = [pair_data(ctx.tokenizer, p) for p in batch]
    totals = {"loss": 0.0, "nll": 0.0, "odds_ratio_loss": 0.0, "margin": 0.0, "accuracy": 0.0}
    for part in chunks(data, ctx.micro_batches):
        flat = [d for c, r in part for d in (c, r)]
        share = len(part) / len(data)

        def objective(datums: list[Any], logprobs: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
            avg_c = torch.stack([_mean_logprob(lp, d) for lp, d in zip(logprobs[0::2], datums[0::2])])
            avg_r = torch.stack([_mean_logprob(lp, d) for lp, d in zip(logprobs[1::2], datums[1::2])])
            nll = -avg_c.mean()
            odds_ratio_loss = -F.logsigmoid(_log_odds(avg_c) - _log_odds(avg_r)).mean()
            loss = nll + beta * odds_ratio_loss
            margin = beta * (avg_c - avg_r)
            stats = {"loss": loss, "nll": nll, "odds_ratio_loss": odds_ratio_loss, "margin": margin.mean(),
                     "accuracy": (margin > 0).float().mean()}
            for k, v in stats.items():
                totals[k] += share * float(v.detach())
            return loss * share, {}

        ctx.policy.forward_backward_custom(flat, objective).result()
    opt = ctx.policy.optim_step(ctx.adam).result()
    return {**totals, "pairs": float(len(data)), **optim_metrics(opt)}
