"""Supervised fine-tuning: cross-entropy on the answer tokens of each example."""

from __future__ import annotations

from runner.recipes.base import Recipe, StepContext, answer_datum, chunks, optim_metrics, weights_of
from runner.tasks import Example


def train_step(ctx: StepContext, batch: list[Example]) -> dict[str, float]:
    """Accumulate cross-entropy over the micro-batches, then one optimizer step. The loss is
    the trainer's summed loss per answer token; a micro-batch whose loss the trainer did not
    report leaves the step's loss out (a partial sum is not the step's loss)."""
    data = [answer_datum(ctx.tokenizer, ex) for ex in batch]
    losses, tokens = [], 0.0
    for chunk in chunks(data, ctx.micro_batches):
        out = ctx.policy.forward_backward(chunk, "cross_entropy").result()
        losses.append((out.metrics or {}).get("loss:sum"))
        tokens += sum(float(weights_of(d).sum()) for d in chunk)
    opt = ctx.policy.optim_step(ctx.adam).result()
    loss = {"loss": sum(map(float, losses)) / max(tokens, 1.0)} if None not in losses else {}
    return {**loss, "tokens": tokens, **optim_metrics(opt)}


RECIPE = Recipe("sft", train_step)
