"""What every recipe shares: the context a training step runs in, the recipe interface
(``Recipe``, its ``RecipeSettings``, the ``TrainingData`` it trains on), and the datum
builders (token sequences weighted on the part that is learned).

A recipe is one module of runner.recipes that defines ``RECIPE = Recipe(...)``: its kind,
its ``train_step(ctx, batch) -> metrics``, its typed settings (a frozen dataclass whose
fields are its keys of the spec's [recipe] table, and which answers whether the run needs a
frozen reference and how many new tokens a rollout samples), whether it trains on
examples or preference pairs, and the optional hooks below. The package finds it there:
nothing else names it.
"""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Mapping, Sequence, TypeVar

import torch

from firetitan_track.tracking import Recorder, TrackedService, TrackedTrainingClient
from runner.tasks import Example, load_jsonl, train_batch
from runner.tasks.preference import Pair, load_pairs, pair_batch

if TYPE_CHECKING:  # the spec module reads the registry of recipes: recipes import nothing of it to run
    from fireworks.training.sdk import (AdamParams, Datum, DeploymentSampler, FiretitanTrainingClient,
                                        OptimStepResponse, SamplingConcurrencyController)

    from runner.spec import KeyCheck, Spec
    from runner.tokenizer import Tokenizer

__all__ = ["Recipe", "RecipeSettings", "TrainingData", "EXAMPLES", "PAIRS", "StepContext", "weighted_datum",
           "masked_datum", "visible_text", "answer_datum", "chunks", "optim_metrics", "step_on_pairs"]

# Any is left where a value's class is each recipe's own: the items it trains on (Examples or
# Pairs, as its TrainingData says; a Callable over list[Example] is no Callable over a wider
# list), its settings (its own RecipeSettings subclass, read field by field), what it keeps in
# ``memo``, and ``step_record`` (StepCompleted's keyword fields, each of its own type).

T = TypeVar("T")
E = TypeVar("E")  # what a preference objective takes per pair besides its two datums


@dataclass
class StepContext:
    """What a recipe's train_step may use."""

    spec: Spec
    tracked: TrackedService
    policy: TrackedTrainingClient  # the tracked training client
    reference: FiretitanTrainingClient | None  # a frozen reference client, when the recipe asked for one
    tokenizer: Tokenizer
    adam: AdamParams  # the SDK's AdamParams for every optim_step
    loop: asyncio.AbstractEventLoop
    new_controller: Callable[[], SamplingConcurrencyController]  # a fresh concurrency controller per sync
    step: int = 0  # the step being trained (begin_step)
    last_snapshot: str | None = None
    controller: SamplingConcurrencyController | None = field(default=None)
    memo: dict[str, Any] = field(default_factory=dict)  # what a recipe keeps across the steps of one attempt
    rec: Recorder | None = None  # the run's Recorder (None where nothing is recorded: a benchmark's bare loop)
    batch_of: Callable[[int], list[Any]] | None = None  # the training batch of any step (a pure function of it)
    sampler: DeploymentSampler | None = None  # the sampler of the last sync
    serves: int | None = None  # the step whose trained weights the deployment serves (None: not known)
    step_record: dict[str, Any] = field(default_factory=dict)  # extra StepCompleted fields of this step

    @property
    def micro_batches(self) -> int:
        return self.spec.recipe.micro_batches

    @property
    def settings(self) -> Any:
        """The recipe's own typed settings (its Recipe.settings class)."""
        return self.spec.recipe.settings

    def begin_step(self, step: int) -> None:
        """Step ``step`` starts: the recorder's events from here on belong to it, and its
        StepCompleted has no extra fields yet."""
        self.step = step
        if self.rec is not None:
            self.rec.step = step
        self.step_record = {}

    def run_async(self, coro: Awaitable[T]) -> T:
        return self.loop.run_until_complete(coro)

    def sync_policy(self, name: str, *, trained_through: int | None = None) -> DeploymentSampler:
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


@dataclass(frozen=True)
class RecipeSettings:
    """A recipe's own keys of [recipe]: a recipe subclasses it as a frozen dataclass whose
    fields (with their defaults) are those keys. A key two recipes share (grpo's
    ``group_size``, which async_grpo and igpo inherit) means one thing: one type, one default."""

    def check(self, bad: KeyCheck) -> None:
        """Raise ``bad("recipe.KEY", why)`` (or a bound of ``bad``'s) for a value no run can train with."""

    def needs_reference(self) -> bool:
        """Whether the run provisions a frozen reference client for the objective."""
        return False

    def new_tokens(self) -> int:
        """How many new tokens one rollout samples (0: the recipe samples nothing to train on)."""
        return 0

    def rollouts_per_prompt(self) -> int | None:
        """How many rollouts a step samples per prompt (None: each example is trained once)."""
        return None


@dataclass(frozen=True)
class TrainingData:
    """What a recipe trains on, and how it is read from a JSONL file, restored from the
    record, and cut into the batch of a step (a pure function of seed and step)."""

    load: Callable[..., list[Any]]  # (path, *, what) -> items
    from_json: Callable[[dict[str, Any]], Any]
    batch: Callable[..., tuple[list[Any], dict[str, int]]]  # (task, data, *, seed, step, size, digits)


EXAMPLES = TrainingData(load_jsonl, Example.from_json, train_batch)  # prompt and answer
PAIRS = TrainingData(load_pairs, Pair.from_json, pair_batch)  # prompt, chosen and rejected answer

# a multi-turn recipe's eval: (ctx, sampler, prompt index, example, sampling) -> one record per episode
PlayEval = Callable[[StepContext, "DeploymentSampler", int, Example, dict[str, Any]],
                    Awaitable[list[dict[str, Any]]]]
# a check that raises ``bad(key, why)`` where a sequence of the run's cannot fit the model's
# context: (spec, bad, context, tokenizer, eval set)
CheckContext = Callable[["Spec", "KeyCheck", int, "Tokenizer", Sequence[Example]], None]


@dataclass(frozen=True)
class Recipe:
    """What one training step does, and what the run must provide for it."""

    kind: str  # recipe.kind in a spec
    train_step: Callable[[StepContext, list[Any]], dict[str, float]]
    settings: type[RecipeSettings] = RecipeSettings  # its typed keys of [recipe]
    data: TrainingData = EXAMPLES  # examples, or preference pairs
    # called once the step is recorded (async_grpo syncs the step's weights there, so a
    # step's record precedes the snapshot it made)
    publish: Callable[[StepContext], None] | None = None
    play_eval: PlayEval | None = None  # a multi-turn recipe plays its eval's episodes itself
    # a recipe whose sequences are more than a prompt and its new tokens (a multi-turn
    # recipe's episodes) checks they fit the model's context itself
    check_context: CheckContext | None = None

    @property
    def multi_turn(self) -> bool:
        """It plays a built-in multi-turn task (and only such a recipe plays one)."""
        return self.play_eval is not None

    def read_settings(self, values: Mapping[str, object]) -> RecipeSettings:
        """Its settings out of a [recipe] table's values (every recipe's keys)."""
        return self.settings(**{f.name: values[f.name] for f in dataclasses.fields(self.settings)})


def weighted_datum(tokens: Sequence[int], first_learned: int) -> Datum:
    """A next-token datum over ``tokens``: targets are the tokens shifted by one, weighted
    1 from the target at index ``first_learned`` on (the prompt before it is context)."""
    learned = [False] * first_learned + [True] * (len(tokens) - first_learned)
    return masked_datum(tokens, learned)


def masked_datum(tokens: Sequence[int], learned: Sequence[bool]) -> Datum:
    """A next-token datum over ``tokens`` weighted 1 on the tokens ``learned`` marks (the
    first token, with nothing before it, is never a target)."""
    from fireworks.training.sdk import Datum, ModelInput, TensorData

    weights = torch.tensor([1.0 if flag else 0.0 for flag in learned[1:]], dtype=torch.float32)
    return Datum(
        model_input=ModelInput.from_ints(list(tokens[:-1])),
        loss_fn_inputs={"target_tokens": TensorData.from_torch(torch.tensor(list(tokens[1:]), dtype=torch.int64)),
                        "weights": TensorData.from_torch(weights)},
    )


def prompt_tokens(tokenizer: Tokenizer, example: Example | Pair) -> list[int]:
    """The example's (or the pair's) chat, rendered with the generation prompt, as token ids."""
    return list(tokenizer.apply_chat_template(example.chat(), add_generation_prompt=True, tokenize=True,
                                              return_dict=False))


def answer_datum(tokenizer: Tokenizer, example: Example, answer: str | None = None) -> Datum:
    """Prompt (chat template) + answer + end-of-turn, weighted on the answer only."""
    prompt = prompt_tokens(tokenizer, example)
    completion = tokenizer.encode(example.answer if answer is None else answer, add_special_tokens=False)
    return weighted_datum(prompt + completion + [tokenizer.convert_tokens_to_ids("<|im_end|>")], len(prompt))


def visible_text(tokenizer: Tokenizer, text: str) -> str:
    """A completion as a reader sees it: special tokens (the end-of-turn marker) removed."""
    for special in tokenizer.all_special_tokens:
        text = text.replace(special, "")
    return text


def weights_of(datum: Datum) -> torch.Tensor:
    return datum.loss_fn_inputs["weights"].to_torch()


def chunks(items: list[T], parts: int) -> list[list[T]]:
    """``items`` in ``parts`` consecutive micro-batches (the last takes the remainder)."""
    per = len(items) // parts
    return [items[i * per:(i + 1) * per] if i < parts - 1 else items[i * per:] for i in range(parts)]


def optim_metrics(result: OptimStepResponse) -> dict[str, float]:
    """The optimizer step's numeric metrics, under ``optim/``."""
    return {f"optim/{k}": float(v) for k, v in (getattr(result, "metrics", None) or {}).items()
            if isinstance(v, (int, float))}


# (chosen logprobs, rejected logprobs, chosen datums, rejected datums, per-pair extras)
#   -> (loss, {metric: tensor}); the metrics include "loss"
PairLoss = Callable[[list[torch.Tensor], list[torch.Tensor], list["Datum"], list["Datum"], list[E]],
                    tuple[torch.Tensor, dict[str, torch.Tensor]]]


def step_on_pairs(ctx: StepContext, pairs: list[tuple[tuple[Datum, Datum], E]],
                  pair_loss: PairLoss[E]) -> dict[str, float]:
    """One optimizer step over preference pairs ``((chosen, rejected), extra)``, accumulated
    over the micro-batches through ``forward_backward_custom``; each micro-batch's mean
    loss and metrics weigh by its share of the pairs."""
    totals: dict[str, float] = {}
    for part in chunks(pairs, ctx.micro_batches):
        flat = [d for (c, r), _ in part for d in (c, r)]
        extras = [e for _, e in part]
        share = len(part) / len(pairs)

        def objective(datums: list[Datum], logprobs: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
            loss, stats = pair_loss(logprobs[0::2], logprobs[1::2], datums[0::2], datums[1::2], extras)
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + share * float(v.detach())
            return loss * share, {}

        ctx.policy.forward_backward_custom(flat, objective).result()
    opt = ctx.policy.optim_step(ctx.adam).result()
    return {**totals, "pairs": float(len(pairs)), **optim_metrics(opt)}
