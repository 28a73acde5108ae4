"""What every recipe shares: the context a training step runs in, the recipe interface,
and the datum builders (token sequences weighted on the part that is learned).

A recipe is a module with ``needs_reference(spec) -> bool`` (whether the run must
provision a frozen reference client) and ``train_step(ctx, batch) -> metrics``; optionally
``publish(ctx)``, which the loop calls once the step is recorded (async_grpo syncs the
step's weights there, so a step's record precedes the snapshot it made).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import torch

from firetitan_track.tracking import TrackedService
from runner.spec import Spec
from runner.tasks import Example

__all__ = ["Recipe", "StepContext", "weighted_datum", "masked_datum", "visible_text", "answer_datum", "chunks",
           "optim_metrics", "step_on_pairs"]


@dataclass
class StepContext:
    """What a recipe's train_step may use."""

    spec: Spec
    tracked: TrackedService
    policy: Any  # the tracked training client
    reference: Any  # a frozen reference client, when the recipe asked for one
    tokenizer: Any
    adam: Any  # the SDK's AdamParams for every optim_step
    loop: asyncio.AbstractEventLoop
    new_controller: Callable[[], Any]  # a fresh concurrency controller per sync
    step: int = 0
    rec: Any = None  # the run's Recorder: what a recipe records of its step beyond the metrics
    last_snapshot: str | None = None
    controller: Any = field(default=None)
    memo: dict[str, Any] = field(default_factory=dict)  # what a recipe keeps across the steps of one attempt
    rec: Any = None  # the run's Recorder (None where nothing is recorded: a benchmark's bare loop)
    batch_of: Callable[[int], list[Any]] | None = None  # the training batch of any step (a pure function of it)
    sampler: Any = None  # the sampler of the last sync
    serves: int | None = None  # the step whose trained weights the deployment serves (None: not known)
    step_record: dict[str, Any] = field(default_factory=dict)  # extra StepCompleted fields of this step

    @property
    def micro_batches(self) -> int:
        return self.spec.recipe.micro_batches

    def run_async(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def sync_policy(self, name: str, *, trained_through: int | None = None) -> Any:
        """Snapshot the policy and hot-load it onto the deployment; return its sampler.
        ``trained_through``: the last step whose optimizer step the weights hold (default:
        this step), so an eval of the same weights reuses the sync instead of publishing again."""
        self.last_snapshot = self.policy.save_weights_for_sampler(name).result().path
        self.controller = self.new_controller()
        self.sampler = self.tracked.create_deployment_sampler(model_path=self.last_snapshot, tokenizer=self.tokenizer,
                                                              concurrency_controller=self.controller)
        self.serves = self.step if trained_through is None else trained_through
        return self.sampler

    def skip(self, reason: str, metrics: dict[str, float]) -> dict[str, float]:
        """A step that ran no optimizer step: recorded as skipped, with its reason and only
        the metrics it measured (no loss it never computed)."""
        self.step_record["skipped"] = reason
        return metrics


class Recipe(Protocol):
    def needs_reference(self, spec: Spec) -> bool: ...

    def train_step(self, ctx: StepContext, batch: list[Example]) -> dict[str, float]: ...


def weighted_datum(tokens: Sequence[int], first_learned: int) -> Any:
    """A next-token datum over ``tokens``: targets are the tokens shifted by one, weighted
    1 from the target at index ``first_learned`` on (the prompt before it is context)."""
    learned = [False] * first_learned + [True] * (len(tokens) - first_learned)
    return masked_datum(tokens, learned)


def masked_datum(tokens: Sequence[int], learned: Sequence[bool]) -> Any:
    """A next-token datum over ``tokens`` weighted 1 on the tokens ``learned`` marks (the
    first token, with nothing before it, is never a target)."""
    from fireworks.training.sdk import Datum, ModelInput, TensorData

    weights = torch.tensor([1.0 if flag else 0.0 for flag in learned[1:]], dtype=torch.float32)
    return Datum(
        model_input=ModelInput.from_ints(list(tokens[:-1])),
        loss_fn_inputs={"target_tokens": TensorData.from_torch(torch.tensor(list(tokens[1:]), dtype=torch.int64)),
                        "weights": TensorData.from_torch(weights)},
    )


def prompt_tokens(tokenizer: Any, example: Example) -> list[int]:
    """The example's chat, rendered with the generation prompt, as token ids."""
    return list(tokenizer.apply_chat_template(example.chat(), add_generation_prompt=True, tokenize=True,
                                              return_dict=False))


def answer_datum(tokenizer: Any, example: Example, answer: str | None = None) -> Any:
    """Prompt (chat template) + answer + end-of-turn, weighted on the answer only."""
    prompt = prompt_tokens(tokenizer, example)
    completion = tokenizer.encode(example.answer if answer is None else answer, add_special_tokens=False)
    return weighted_datum(prompt + completion + [tokenizer.convert_tokens_to_ids("<|im_end|>")], len(prompt))


def visible_text(tokenizer: Any, text: str) -> str:
    """A completion as a reader sees it: special tokens (the end-of-turn marker) removed."""
    for special in tokenizer.all_special_tokens:
        text = text.replace(special, "")
    return text


def weights_of(datum: Any) -> torch.Tensor:
    return datum.loss_fn_inputs["weights"].to_torch()


def chunks(items: list[Any], parts: int) -> list[list[Any]]:
    """``items`` in ``parts`` consecutive micro-batches (the last takes the remainder)."""
    per = len(items) // parts
    return [items[i * per:(i + 1) * per] if i < parts - 1 else items[i * per:] for i in range(parts)]


def optim_metrics(result: Any) -> dict[str, float]:
    """The optimizer step's numeric metrics, under ``optim/``."""
    return {f"optim/{k}": float(v) for k, v in (getattr(result, "metrics", None) or {}).items()
            if isinstance(v, (int, float))}


# (chosen logprobs, rejected logprobs, chosen datums, rejected datums, per-pair extras)
#   -> (loss, {metric: tensor}); the metrics include "loss"
PairLoss = Callable[[list[torch.Tensor], list[torch.Tensor], list[Any], list[Any], list[Any]],
                    tuple[torch.Tensor, dict[str, torch.Tensor]]]


def step_on_pairs(ctx: StepContext, pairs: list[tuple[tuple[Any, Any], Any]], pair_loss: PairLoss) -> dict[str, float]:
    """One optimizer step over preference pairs ``((chosen, rejected), extra)``, accumulated
    over the micro-batches through ``forward_backward_custom``; each micro-batch's mean
    loss and metrics weigh by its share of the pairs."""
    totals: dict[str, float] = {}
    for part in chunks(pairs, ctx.micro_batches):
        flat = [d for (c, r), _ in part for d in (c, r)]
        extras = [e for _, e in part]
        share = len(part) / len(pairs)

        def objective(datums: list[Any], logprobs: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
            loss, stats = pair_loss(logprobs[0::2], logprobs[1::2], datums[0::2], datums[1::2], extras)
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + share * float(v.detach())
            return loss * share, {}

        ctx.policy.forward_backward_custom(flat, objective).result()
    opt = ctx.policy.optim_step(ctx.adam).result()
    return {**totals, "pairs": float(len(pairs)), **optim_metrics(opt)}
