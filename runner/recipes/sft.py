"""Supervised fine-tuning: cross-entropy on the answer tokens of each example."""

from __future__ import annotations

from typing import Any

import torch

from runner.tasks import Example


def datum(tokenizer: Any, example: Example) -> Any:
    """Prompt (chat template) + answer + end-of-turn, weighted on the answer only."""
    from fireworks.training.sdk import Datum, ModelInput, TensorData

    prompt = tokenizer.apply_chat_template(example.chat(), add_generation_prompt=True, tokenize=True,
                                           return_dict=False)
    answer = tokenizer.encode(example.answer, add_special_tokens=False) + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    full = list(prompt) + answer
    weights = torch.zeros(len(full) - 1, dtype=torch.float32)
    weights[len(prompt) - 1:] = 1.0
    return Datum(
        model_input=ModelInput.from_ints(full[:-1]),
        loss_fn_inputs={
            "target_tokens": TensorData.from_torch(torch.tensor(full[1:], dtype=torch.int64)),
            "weights": TensorData.from_torch(weights),
        },
    )


def train_step(ctx: Any, batch: list[Example]) -> dict[str, float]:
    """Accumulate cross-entropy over the micro-batches, then one optimizer step."""
    data = [datum(ctx.tokenizer, ex) for ex in batch]
    per = len(data) // ctx.micro_batches
    loss_sum, tokens = 0.0, 0.0
    for i in range(ctx.micro_batches):
        chunk = data[i * per:(i + 1) * per] if i < ctx.micro_batches - 1 else data[i * per:]
        out = ctx.policy.forward_backward(chunk, "cross_entropy").result()
        loss_sum += float(out.metrics.get("loss:sum", 0.0))
        tokens += sum(float(d.loss_fn_inputs["weights"].to_torch().sum()) for d in chunk)
    opt = ctx.policy.optim_step(ctx.adam).result()
    metrics = {"loss": loss_sum / max(tokens, 1.0), "tokens": tokens}
    metrics.update({f"optim/{k}": float(v) for k, v in (getattr(opt, "metrics", None) or {}).items()
                    if isinstance(v, (int, float))})
    return metrics
