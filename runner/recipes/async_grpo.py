"""Async GRPO: rollouts sampled through the deployment while the trainer trains, at most
``recipe.max_offpolicy_versions`` (K) weight versions behind the weights they train on,
corrected by clipped importance weights.

Versions. Version v is the policy after v optimizer steps. Every step publishes one: one
optimizer step, StepCompleted, then one snapshot + sync (``publish``, which the loop calls
after recording the step), after which rollouts are sampled from it. Step s trains version
s-1 into version s.

Schedule (the cookbook's async admission, ``published + K + 1`` batches in flight, made
exact). The rollouts of step b are sampled from version ``max(0, b-1-K)``: once version s-1
is published, step s sends the rollouts of step s+K and trains its own batch while they are
sampled, so sampling overlaps training and no batch lags its step by more than K versions.
Version s is published only after every rollout sent on version s-1 has returned, so no hot
load lands inside a rollout: each was sampled from the one snapshot its record names.
K = 0 samples and trains in turn, the on-policy history grpo has.

Record. Each batch's rollouts are one SamplesDrawn (its ``batch``, the snapshot and version
they were sampled from, the prompts and the completions with the sampler's logprobs as
blobs, a digest per sequence), recorded when they return: their admission. StepCompleted
names the rollouts it trained on (``provenance.samples_digest``: [event id, index]) and
their staleness (``version_offsets``: versions published before the step minus those
published before the sample was sent, the recorder's definition, provenance.version_offsets).

Objective. For completion token t of rollout i, with advantage A_i (its reward minus its
group's mean), the policy's log-probability lp_t and the sampler's lq_t::

    ratio_t = exp(lp_t - lq_t)
    loss    = mean over all completion tokens of -min(ratio_t * A_i, clip(ratio_t, 1-eps, 1+eps) * A_i)
              + kl_coef * KL estimate to the frozen reference (as grpo)

the importance weight corrects for the rollouts' lag; the clip (PPO's) keeps a stale rollout
from moving the policy far. ``eps`` is ``recipe.clip_epsilon``.

Exact resume. Every rollout is sampled with a seed from (run seed, batch, prompt, completion),
so the same weights give the same rollouts. A resume from the state saved at step k trains
on the recorded rollouts of every batch sampled from a version <= k (the weights of its
history): those sampled from versions < k were admitted before version k was published, so
before that state; those sampled from version k by the crashed attempt are re-recorded
(``replayed_from``). Only batches still due on version k, or later, are sampled anew.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypedDict, cast

import torch

from firetitan_track.events import RecordedEvent, SamplesDrawn
from firetitan_track.recording.provenance import sequence_digest, version_offsets
from runner.recipes import grpo
from runner.recipes.base import Recipe, StepContext, optim_metrics, visible_text, weighted_datum, weights_of
from runner.recipes.grpo import NO_COMPLETION, group_advantages
from runner.tasks import Example, grade

if TYPE_CHECKING:
    from fireworks.training.sdk import Datum, DeploymentSampler, SampledCompletion

    from runner.spec import KeyCheck

__all__ = ["RECIPE", "Settings", "MAX_OFFPOLICY_VERSIONS", "train_step", "publish", "sampled_from"]

MAX_OFFPOLICY_VERSIONS = 64  # batches of rollouts sampled ahead of the trainer, held in memory


@dataclass(frozen=True)
class Settings(grpo.Settings):
    """grpo's, with the bound on the rollouts' lag and the importance weights' clip."""

    # how many weight versions a batch's rollouts may lag the weights it trains (0: on-policy)
    max_offpolicy_versions: int = 0
    clip_epsilon: float = 0.2  # importance weights are clipped to [1 - eps, 1 + eps]

    def check(self, bad: KeyCheck) -> None:
        super().check(bad)
        if not 0 <= self.max_offpolicy_versions <= MAX_OFFPOLICY_VERSIONS:
            raise bad("recipe.max_offpolicy_versions", f"must be 0 (on-policy) to {MAX_OFFPOLICY_VERSIONS} (each "
                                                       "version ahead is one batch of rollouts held in memory), got "
                                                       f"{self.max_offpolicy_versions}")
        if not 0 < self.clip_epsilon < 1:
            raise bad("recipe.clip_epsilon", f"must be in (0, 1), got {self.clip_epsilon}")


def sampled_from(batch: int, max_offpolicy: int) -> int:
    """The weight version the rollouts of step ``batch`` are sampled from."""
    return max(0, batch - 1 - max_offpolicy)


class Rollout(TypedDict):
    """One recorded rollout (a row of SamplesDrawn's completions blob)."""

    prompt: int  # its prompt's index in the batch
    text: str
    finish_reason: str
    prompt_len: int
    tokens: list[int]  # prompt and completion
    sampling_logprobs: list[float | None]  # the sampler's, one per completion token
    reward: float


@dataclass
class Batch:
    """One step's admitted rollouts, as recorded."""

    step: int  # the step that trains on them
    version: int  # the weight version they were sampled from
    event_id: str | None  # their SamplesDrawn (None where nothing is recorded)
    rollouts: list[Rollout]
    samples_digest: str | None = None  # the blob of [event id, index] of those with a completion (provenance)


def _trainable(rollouts: list[Rollout]) -> list[int]:
    """The rollouts with a completion: the ones a step trains on."""
    return [n for n, x in enumerate(rollouts) if len(x["tokens"]) > x["prompt_len"]]


def _admitted(ctx: StepContext, batch: Batch) -> Batch:
    """Store the provenance rows of a recorded batch when it is admitted (while the trainer
    trains another), not on the trainer's path."""
    used = _trainable(batch.rollouts)
    if ctx.rec is not None and batch.event_id is not None and used:
        batch.samples_digest = ctx.rec.put_json([[batch.event_id, n] for n in used])
    return batch


class _Pipeline:
    """The batches sampled ahead of the trainer, in one attempt of a run."""

    def __init__(self, ctx: StepContext, first_step: int):
        self.ready: dict[int, Batch] = {}
        self.recorded = _recorded_batches(ctx, resumed_at=first_step - 1)


def _pipeline(ctx: StepContext) -> _Pipeline:
    pipe = ctx.memo.get("async_grpo")
    if pipe is None:
        pipe = ctx.memo["async_grpo"] = _Pipeline(ctx, ctx.step)
    return pipe


def train_step(ctx: StepContext, batch: list[Example]) -> dict[str, float]:
    s, r = ctx.step, ctx.settings
    k, last = r.max_offpolicy_versions, ctx.spec.run.steps
    pipe = _pipeline(ctx)
    due = [b for b in range(s, min(s + k, last) + 1) if b not in pipe.ready]
    for b in [b for b in due if b in pipe.recorded]:
        pipe.ready[b] = _replay(ctx, pipe.recorded.pop(b))
    due = [b for b in due if b not in pipe.ready]
    for b in due:
        if sampled_from(b, k) != s - 1:  # admitted before the state this attempt started from
            raise RuntimeError(f"the record lacks the rollouts of step {b} (sampled from version "
                               f"{sampled_from(b, k)}), which step {s} needs; the ledger is incomplete")
    if due and ctx.serves != s - 1:  # a resumed attempt publishes its state's weights first
        ctx.sync_policy(f"async-{s - 1}", trained_through=s - 1)
    if s in due:  # this step's own rollouts come first: nothing to overlap them with
        pipe.ready[s] = ctx.run_async(_sample_batch(ctx, s, batch))
        due.remove(s)

    # the step's metrics, then the batches sampled meanwhile (one gather, so one list of both: Any)
    async def train_while_sampling() -> list[Any]:
        training = asyncio.get_running_loop().run_in_executor(None, _train, ctx, pipe.ready.pop(s))
        return await asyncio.gather(training, *(_sample_batch(ctx, b, ctx.batch_of(b)) for b in due))

    metrics, *sampled = ctx.run_async(train_while_sampling())
    pipe.ready.update({b.step: b for b in sampled})
    return metrics


def publish(ctx: StepContext) -> None:
    """After the step is recorded: snapshot its weights and sync them, so the next batch is
    sampled from them (an eval of this step samples them too)."""
    if "skipped" in ctx.step_record:  # the weights did not change: the served version is this one
        ctx.serves = ctx.step if ctx.serves == ctx.step - 1 else ctx.serves
    else:
        ctx.sync_policy(f"async-{ctx.step}")


# -- sampling ---------------------------------------------------------------------------------


def _seed(run_seed: int, batch: int, prompt: int, completion: int) -> int:
    key = f"async_grpo:{run_seed}:{batch}:{prompt}:{completion}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") >> 1  # the service takes 63 bits


async def _sample_one(sampler: DeploymentSampler, example: Example, *, seed: int,
                      settings: Settings) -> SampledCompletion:
    """One rollout: n=1 with its own seed (n>1 in one call would share the seed)."""
    out = await sampler.sample_with_tokens(messages=example.chat(), n=1, max_tokens=settings.max_tokens,
                                           temperature=settings.temperature, logprobs=True, seed=seed)
    return out[0]


async def _sample_batch(ctx: StepContext, step: int, examples: list[Example]) -> Batch:
    """Sample step ``step``'s rollouts from the served version and record their admission."""
    r: Settings = ctx.settings
    seed, g = ctx.spec.run.seed, r.group_size
    version, snapshot, sampler = ctx.serves, ctx.last_snapshot, ctx.sampler
    assert version is not None and sampler is not None
    outs = await asyncio.gather(*(_sample_one(sampler, ex, seed=_seed(seed, step, i, j), settings=r)
                                  for i, ex in enumerate(examples) for j in range(g)))
    rollouts: list[Rollout] = []
    for n, c in enumerate(outs):
        ex = examples[n // g]
        tokens = [int(t) for t in c.full_tokens]
        logprobs = list(c.sampling_logprobs or [])
        if len(logprobs) != len(tokens) - c.prompt_len:
            raise RuntimeError(f"step {step}: the deployment returned {len(logprobs)} sampler logprobs for a "
                               f"completion of {len(tokens) - c.prompt_len} tokens; async_grpo needs one per token")
        rollouts.append({"prompt": n // g, "text": c.text, "finish_reason": c.finish_reason,
                         "prompt_len": int(c.prompt_len), "tokens": tokens, "sampling_logprobs": logprobs,
                         "reward": grade(ex.answer, visible_text(ctx.tokenizer, c.text))})
    event_id = None
    if ctx.rec is not None:
        ev = ctx.rec.record(SamplesDrawn(
            deployment=ctx.tracked.deployment_id, snapshot_at_send=snapshot,
            snapshot_at_return=snapshot, version_at_send=version, version_at_return=version,
            prompt_digest=ctx.rec.put_json([ex.to_json() for ex in examples]),
            completions_digest=ctx.rec.put_json(rollouts),
            sequence_digests=[sequence_digest(x["tokens"]) for x in rollouts],
            sampling={"group_size": g, "max_tokens": r.max_tokens, "temperature": r.temperature},
            step=ctx.step, batch=step, call="sample_with_tokens"))
        event_id = ev.event_id
    return _admitted(ctx, Batch(step, version, event_id, rollouts))


# -- resume ------------------------------------------------------------------------------------


def _recorded_batches(ctx: StepContext, *, resumed_at: int) -> dict[int, RecordedEvent]:
    """Batch -> the SamplesDrawn of its rollouts, for every batch after ``resumed_at`` sampled
    from a version the run's history holds (<= ``resumed_at``): the authoritative record,
    else the latest a crashed attempt left."""
    if ctx.rec is None:
        return {}
    from firetitan_track.projections.run_state import authoritative

    events = ctx.rec.ledger.read(ctx.rec.run_id)
    kept = {ev.version for ev in authoritative(events)}
    found: dict[int, RecordedEvent] = {}
    for ev in events:
        drawn = ev.fact
        if not isinstance(drawn, SamplesDrawn) or drawn.batch is None or drawn.batch <= resumed_at \
                or drawn.version_at_send > resumed_at:
            continue
        held = found.get(drawn.batch)
        if held is None or ev.version in kept or held.version not in kept:
            found[drawn.batch] = ev
    return found


def _replay(ctx: StepContext, ev: RecordedEvent) -> Batch:
    """A recorded batch, trained as recorded; re-recorded when a resume superseded its record."""
    rec = ctx.rec
    from firetitan_track.projections.run_state import superseded_versions

    event_id, drawn = ev.event_id, cast(SamplesDrawn, ev.fact)  # only SamplesDrawn are collected
    if ev.version in superseded_versions(rec.ledger.read(rec.run_id)):
        again = drawn.replace(replayed_from=ev.event_id if drawn.replayed_from is None else drawn.replayed_from)
        event_id = rec.record(again).event_id
    return _admitted(ctx, Batch(drawn.batch, drawn.version_at_send, event_id,
                                cast("list[Rollout]", rec.ledger.get_json(drawn.completions_digest))))


# -- training ----------------------------------------------------------------------------------


def _train(ctx: StepContext, batch: Batch) -> dict[str, float]:
    """One optimizer step on ``batch`` (the clipped importance-weighted objective above)."""
    s, r = ctx.step, ctx.settings
    lag = s - 1 - batch.version
    if not 0 <= lag <= r.max_offpolicy_versions:  # the schedule admits nothing staler
        raise RuntimeError(f"step {s}: rollouts of version {batch.version} are {lag} versions behind; "
                           f"recipe.max_offpolicy_versions is {r.max_offpolicy_versions}")
    by_prompt: dict[int, list[int]] = {}
    for n, x in enumerate(batch.rollouts):
        by_prompt.setdefault(x["prompt"], []).append(n)
    advantage = {n: a for ns in by_prompt.values()
                 for n, a in zip(ns, group_advantages([batch.rollouts[n]["reward"] for n in ns]))}
    used = _trainable(batch.rollouts)
    if batch.event_id is not None:
        ctx.step_record["provenance"] = {"datums": len(used), "matched": len(used),
                                         **({"samples_digest": batch.samples_digest} if batch.samples_digest else {})}
    if not used:
        return ctx.skip(NO_COMPLETION, {"rollouts": 0.0})
    offsets = version_offsets([lag] * len(used))
    if offsets is not None:
        ctx.step_record["version_offsets"] = offsets

    data, masks, sampler_lp, advantages = [], [], [], []
    for n in used:
        x = batch.rollouts[n]
        d = weighted_datum(x["tokens"], x["prompt_len"])
        lq = torch.zeros(len(x["tokens"]) - 1)
        lq[x["prompt_len"] - 1:] = torch.tensor(x["sampling_logprobs"], dtype=torch.float32)
        data.append(d)
        masks.append(weights_of(d))
        sampler_lp.append(lq)
        advantages.append(advantage[n])
    ref_logprobs = None
    if ctx.reference is not None:
        ref_logprobs = [o["logprobs"].to_torch() for o in ctx.reference.forward(data, "cross_entropy").result().loss_fn_outputs]
    n_tokens = float(sum(m.sum() for m in masks))
    eps = r.clip_epsilon
    measured: dict[str, float] = {}

    def objective(_data: list[Datum], logprobs: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        pg = torch.zeros(())
        weight_sum = clipped = 0.0
        for a, lp, lq, m in zip(advantages, logprobs, sampler_lp, masks):
            ratio = torch.exp(lp - lq) * m
            surrogate = torch.minimum(ratio * a, torch.clamp(ratio, 1 - eps, 1 + eps) * a)
            pg = pg - (surrogate * m).sum()
            weight_sum += float((ratio.detach() * m).sum())
            clipped += float((((ratio.detach() - 1).abs() > eps).float() * m).sum())
        pg = pg / n_tokens
        kl = torch.zeros(())
        if ref_logprobs is not None:
            kl = sum(((lp - ref.detach()) * m).sum() for lp, ref, m in zip(logprobs, ref_logprobs, masks)) / n_tokens
        loss = pg + r.kl_coef * kl
        measured.update(loss=float(loss.detach()), pg_loss=float(pg.detach()), importance_weight=weight_sum / n_tokens,
                        clipped=clipped / n_tokens, **({"kl": float(kl.detach())} if ref_logprobs is not None else {}))
        return loss, {}

    ctx.policy.forward_backward_custom(data, objective).result()
    opt = ctx.policy.optim_step(ctx.adam).result()
    rewards = [batch.rollouts[n]["reward"] for n in used]
    return {"reward": sum(rewards) / len(rewards), "rollouts": float(len(used)), **measured, **optim_metrics(opt)}


RECIPE = Recipe("async_grpo", train_step, Settings, publish=publish)
