"""Supervised fine-tuning: cross-entropy on the answer tokens of each example."""

from __future__ import annotations

from runner.recipes.base import StepContext, answer_datum, chunks, optim_metrics, weights_of
from runner.spec import Spec
from runner.tasks import Example


def needs_reference(spec: Spec) -> bool:
    return False


def train_step(ctx: StepContext, batch: list[Example]) -> dict[str, float]:
    """Accumulate cross-entropy over the micro-batches, then one optimizer step."""
    data = [answer_datum(ctx.tokenizer, ex) for ex in batch]
    loss_sum, tokens = 0.0, 0.0
    for chunk in chunks(data, ctx.micro_batches):
        out = ctx.policy.forward_backward(chunk, "cross_entropy").result()
        loss_sum += float(out.metrics.get("loss:sum", 0.0))
        tokens += sum(float(weights_of(d).sum()) for d in chunk)
    opt = ctx.policy.optim_step(ctx.adam).result()
    return {"loss": loss_sum / max(tokens, 1.0), "tokens": tokens, **optim_metrics(opt)}
