"""Odds Ratio Preference Optimization: supervised learning of the chosen answer plus a
penalty on the odds ratio of rejected over chosen. No reference model.

With ``avg`` the policy's mean per-token log-probability of an answer and
``odds = avg - log(1 - exp(avg))`` its log-odds, the loss of a pair is
``-avg_chosen + beta * -log sigmoid(odds_chosen - odds_rejected)``. The implicit reward
of an answer (for ``margin`` and ``accuracy``) is ``beta * avg``, as ORPO reports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from runner.recipes import dpo
from runner.recipes.base import PAIRS, Recipe, StepContext, step_on_pairs, weights_of
from runner.recipes.dpo import pair_data, sequence_logprob
from runner.tasks.preference import Pair

if TYPE_CHECKING:
    from fireworks.training.sdk import Datum

__all__ = ["RECIPE", "Settings", "train_step"]


@dataclass(frozen=True)
class Settings(dpo.Settings):
    """dpo's ``beta``, here the weight of the odds-ratio term; no reference."""

    def needs_reference(self) -> bool:
        return False


def _mean_logprob(logprobs: torch.Tensor, datum: Datum) -> torch.Tensor:
    return sequence_logprob(logprobs, datum) / weights_of(datum).sum().clamp(min=1.0)


def _log_odds(avg: torch.Tensor) -> torch.Tensor:
    # log(p / (1 - p)) with log p = avg < 0; expm1 keeps 1 - p accurate when p is near 1
    avg = avg.clamp(max=-1e-6)
    return avg - torch.log(-torch.expm1(avg))


def train_step(ctx: StepContext, batch: list[Pair]) -> dict[str, float]:
    """One optimizer step over the batch's pairs, accumulated over the micro-batches."""
    beta = ctx.settings.beta
    data = [pair_data(ctx.tokenizer, p) for p in batch]

    def pair_loss(lp_c: list[torch.Tensor], lp_r: list[torch.Tensor], d_c: list[Datum], d_r: list[Datum],
                  _: list[None]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        avg_c = torch.stack([_mean_logprob(lp, d) for lp, d in zip(lp_c, d_c)])
        avg_r = torch.stack([_mean_logprob(lp, d) for lp, d in zip(lp_r, d_r)])
        nll = -avg_c.mean()
        odds_ratio_loss = -F.logsigmoid(_log_odds(avg_c) - _log_odds(avg_r)).mean()
        loss = nll + beta * odds_ratio_loss
        margin = beta * (avg_c - avg_r)
        return loss, {"loss": loss, "nll": nll, "odds_ratio_loss": odds_ratio_loss, "margin": margin.mean(),
                      "accuracy": (margin > 0).float().mean()}

    return step_on_pairs(ctx, [(d, None) for d in data], pair_loss)


RECIPE = Recipe("orpo", train_step, Settings, PAIRS)
