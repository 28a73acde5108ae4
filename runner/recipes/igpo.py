"""IGPO (information-gain policy optimization): multi-turn rollouts on a built-in
multi-turn task, each turn rewarded by how much it raised the policy's belief in the
ground-truth answer, plus the episode's outcome.

A step snapshots the policy and syncs it to the deployment (on-policy, as grpo), plays
``group_size`` episodes per prompt turn by turn through the deployment (the task's
environment answers each turn; every request carries a seed that is a pure function of
(run seed, step, prompt, episode, turn), so a resumed step samples what the
uninterrupted one did), then scores every episode through the trainer's ``forward``:
one baseline pass (the prompt) and one per turn (the conversation up to the
environment's reply to it), each the mean log-probability of the answer as the policy's
next turn. A turn's information gain is the rise of that score over the previous one.
Within a prompt's group the gains and the outcomes (at the last turn) are centered
separately and summed; a turn's advantage is its discounted return (``recipe.gamma``),
given to every token the policy sampled in that turn. The objective and optimizer step
are grpo's (``policy_gradient``), with a per-token advantage.

The step's trajectories (turns, replies, information gains, advantages, outcome) are
stored as one blob and recorded in TrajectoriesRecorded with the snapshot that sampled
them.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import torch

from firetitan_track.events import TrajectoriesRecorded
from runner.recipes import grpo
from runner.recipes.base import Recipe, StepContext, masked_datum, prompt_tokens, visible_text, weighted_datum
from runner.recipes.grpo import group_advantages, policy_gradient
from runner.tasks import TASKS, Example, seed_of

if TYPE_CHECKING:
    from fireworks.training.sdk import DeploymentSampler

    from runner.spec import KeyCheck, Spec
    from runner.tokenizer import Tokenizer

# Any is left in an eval's sampling settings and its per-episode records, as tracking's evaluate
# hands and takes them (dict[str, Any] there), and in a turn's record (text, reply, span, seed).

__all__ = ["RECIPE", "Settings", "train_step", "play_eval", "turn_advantages", "episode_budget", "check_episodes"]


@dataclass(frozen=True)
class Settings(grpo.Settings):
    """grpo's (group_size episodes per prompt, max_tokens per turn), with the episode's length
    and the discount of its later turns."""

    turns: int = 4  # most turns per episode
    gamma: float = 0.95  # discount of later turns' rewards in a turn's advantage

    def check(self, bad: KeyCheck) -> None:
        super().check(bad)
        bad.at_least("recipe.turns", self.turns)
        if not 0 <= self.gamma <= 1:
            raise bad("recipe.gamma", f"must be in [0, 1], got {self.gamma}")


@dataclass
class Episode:
    """One multi-turn trajectory: the whole conversation as token ids, which of them the
    policy sampled, and per turn its span, text and the environment's reply."""

    tokens: list[int]
    learned: list[bool]
    prompt_len: int
    turns: list[dict[str, Any]] = field(default_factory=list)  # text, reply, span, finish_reason, seed
    contexts: list[int] = field(default_factory=list)  # len(tokens) after each turn's reply
    solved: bool = False


def _eos(tokenizer: Tokenizer) -> int:
    return tokenizer.eos_token_id


def reply_tokens(tokenizer: Tokenizer, text: str) -> list[int]:
    """What follows the model's end-of-turn token when the environment answers ``text``:
    the chat template's own rendering of a user turn, then the assistant's generation prompt."""
    rendered = list(tokenizer.apply_chat_template([{"role": "assistant", "content": ""},
                                                   {"role": "user", "content": text}],
                                                  add_generation_prompt=True, tokenize=True, return_dict=False))
    return rendered[rendered.index(_eos(tokenizer)) + 1:]


async def play(sampler: DeploymentSampler, tokenizer: Tokenizer, example: Example, *, task: str,
               turns: int, max_tokens: int, temperature: float, seed: tuple[object, ...] | None) -> Episode:
    """Play one episode of ``task`` through the deployment's ``sampler``: at most ``turns``
    turns of at most ``max_tokens`` tokens each, until the environment says it is solved.
    ``seed`` (parts of) makes each sampled turn's draw a pure function of them and the turn."""
    env = TASKS[task]
    eos = _eos(tokenizer)
    tokens = prompt_tokens(tokenizer, example)
    ep = Episode(list(tokens), [False] * len(tokens), len(tokens))
    for t in range(turns):
        request_seed = seed_of(*seed, t) if seed is not None and temperature > 0 else None
        extra = {"seed": request_seed} if request_seed is not None else {}
        [c] = await sampler.sample_with_prompt_tokens(list(ep.tokens), n=1, max_tokens=max_tokens,
                                                      temperature=temperature, **extra)
        completion = list(c.full_tokens[c.prompt_len:])
        start = len(ep.tokens)
        ep.tokens += completion
        ep.learned += [True] * len(completion)
        if not completion or completion[-1] != eos:  # cut off by max_tokens: the turn is closed for it
            ep.tokens.append(eos)
            ep.learned.append(False)
        text = visible_text(tokenizer, tokenizer.decode(completion))
        reply = env.reply(example.answer, text)
        ep.turns.append({"text": text, "reply": reply.text, "span": [start, start + len(completion)],
                         "finish_reason": c.finish_reason, **({"seed": request_seed} if request_seed is not None else {})})
        ep.tokens += reply_tokens(tokenizer, reply.text)
        ep.learned += [False] * (len(ep.tokens) - len(ep.learned))
        ep.contexts.append(len(ep.tokens))
        if reply.solved:
            ep.solved = True
            break
    return ep


def _transcript(ep: Episode) -> str:
    return " | ".join(f"{t['text']} -> {t['reply']}" for t in ep.turns)


async def play_eval(ctx: StepContext, sampler: DeploymentSampler, index: int, example: Example,
                    sampling: dict[str, Any]) -> list[dict[str, Any]]:
    """The eval's episodes of one held-out prompt (``sampling.n`` of them, sampled with the
    eval's sampling settings; seeded by (run seed, step, prompt, episode) when sampled at a
    temperature): scored 1.0 when solved within ``recipe.turns``."""
    spec, turns = ctx.spec, ctx.settings.turns

    async def one(k: int) -> dict[str, Any]:
        ep = await play(sampler, ctx.tokenizer, example, task=spec.task.name, turns=turns,
                        max_tokens=sampling["max_tokens"], temperature=sampling["temperature"],
                        seed=("igpo-eval", spec.run.seed, ctx.step, index, k))
        return {"text": _transcript(ep), "turns": [{"text": t["text"], "reply": t["reply"]} for t in ep.turns],
                "finish_reason": ep.turns[-1]["finish_reason"],
                "completion_len": sum(ep.learned), "score": 1.0 if ep.solved else 0.0}

    return list(await asyncio.gather(*(one(k) for k in range(sampling["n"]))))


def answer_scores(ctx: StepContext, episodes: list[Episode], answers: list[str]) -> list[list[float]]:
    """Per episode, the mean log-probability of its answer (then end-of-turn) as the policy's
    next turn: after the prompt (the baseline), then after each turn's reply. One trainer
    ``forward`` scores them all (one pass per context)."""
    eos = _eos(ctx.tokenizer)
    data, owners = [], []
    for i, (ep, answer) in enumerate(zip(episodes, answers)):
        answer_ids = list(ctx.tokenizer.encode(answer, add_special_tokens=False)) + [eos]
        for end in [ep.prompt_len, *ep.contexts]:
            data.append(weighted_datum(ep.tokens[:end] + answer_ids, end))
            owners.append(i)
    outputs = ctx.policy.forward(data, "cross_entropy").result().loss_fn_outputs
    scores: list[list[float]] = [[] for _ in episodes]
    for i, datum, out in zip(owners, data, outputs):
        weights = datum.loss_fn_inputs["weights"].to_torch()
        logprobs = out["logprobs"].to_torch()
        scores[i].append(float((logprobs * weights).sum() / weights.sum()))
    return scores


def turn_advantages(gains: list[list[float]], outcomes: list[float], gamma: float) -> list[list[float]]:
    """Per episode of one group, per turn: the information gains (every turn) less their mean
    over all the group's turns, plus the outcome less the group's mean outcome (at the last
    turn), returned backwards with discount ``gamma``: A_t = r_t + gamma * A_(t+1).

    The two are centered, as grpo's rewards are, not scaled to unit variance: while the
    policy holds no belief about the answer its gains are noise of a few thousandths of a
    nat, and scaling them up would make that noise weigh as much as the outcome."""
    flat_gain = group_advantages([x for g in gains for x in g])
    outcome = group_advantages(outcomes)
    advantages, at = [], 0
    for g, o in zip(gains, outcome):
        rewards = flat_gain[at:at + len(g)]
        rewards[-1] += o
        at += len(g)
        ret, row = 0.0, [0.0] * len(g)
        for t in range(len(g) - 1, -1, -1):
            ret = rewards[t] + gamma * ret
            row[t] = ret
        advantages.append(row)
    return advantages


def train_step(ctx: StepContext, batch: list[Example]) -> dict[str, float]:
    sampler = ctx.sync_policy(f"rollout-{ctx.step}", trained_through=ctx.step - 1)
    spec, r = ctx.spec, ctx.settings

    async def rollouts() -> list[Episode]:
        return list(await asyncio.gather(*(
            play(sampler, ctx.tokenizer, ex, task=spec.task.name, turns=r.turns, max_tokens=r.max_tokens,
                 temperature=r.temperature, seed=("igpo", spec.run.seed, ctx.step, i, j))
            for i, ex in enumerate(batch) for j in range(r.group_size))))

    episodes = ctx.run_async(rollouts())
    owners = [ex for ex in batch for _ in range(r.group_size)]
    scores = answer_scores(ctx, episodes, [ex.answer for ex in owners])
    gains = [[s[t + 1] - s[t] for t in range(len(s) - 1)] for s in scores]
    outcomes = [1.0 if ep.solved else 0.0 for ep in episodes]
    advantages: list[list[float]] = []
    for g in range(len(batch)):
        group = slice(g * r.group_size, (g + 1) * r.group_size)
        advantages += turn_advantages(gains[group], outcomes[group], r.gamma)

    data, masks, token_advantages = [], [], []
    for ep, adv in zip(episodes, advantages):
        datum = masked_datum(ep.tokens, ep.learned)
        per_token = torch.zeros(len(ep.tokens) - 1, dtype=torch.float32)
        for turn, a in zip(ep.turns, adv):
            start, end = turn["span"]
            per_token[start - 1:end - 1] = a  # target j is token j + 1
        data.append(datum)
        masks.append(datum.loss_fn_inputs["weights"].to_torch())
        token_advantages.append(per_token)
    _record(ctx, batch, episodes, scores, gains, outcomes, advantages)
    turns = sum(len(ep.turns) for ep in episodes)
    metrics = {"reward": sum(outcomes) / len(outcomes), "info_gain": sum(map(sum, gains)) / turns,
               "turns": turns / len(episodes), "ig_passes": float(sum(len(s) for s in scores))}
    return {**metrics, **policy_gradient(ctx, data, masks, token_advantages)}


def _record(ctx: StepContext, batch: list[Example], episodes: list[Episode], scores: list[list[float]],
            gains: list[list[float]], outcomes: list[float], advantages: list[list[float]]) -> None:
    """TrajectoriesRecorded: the step's episodes as one blob, with the snapshot that sampled them."""
    group = ctx.settings.group_size
    stored = []
    for n, (ep, s, g, o, a) in enumerate(zip(episodes, scores, gains, outcomes, advantages)):
        stored.append({"prompt": n // group, "episode": n % group, "messages": batch[n // group].chat(),
                       "answer": batch[n // group].answer, "outcome": o, "baseline_logprob": s[0],
                       "turns": [{**turn, "answer_logprob": s[t + 1], "info_gain": g[t], "advantage": a[t]}
                                 for t, turn in enumerate(ep.turns)]})
    ctx.rec.record(TrajectoriesRecorded(step=ctx.step, snapshot_path=ctx.last_snapshot,
                                        trajectories_digest=ctx.rec.put_json(stored), trajectories=len(stored),
                                        turns=sum(len(ep.turns) for ep in episodes)), defer=True)


def episode_budget(task: str, turns: int, tokenizer: Tokenizer, example: Example, new_tokens: int) -> int:
    """The most tokens an episode of ``example`` can hold with at most ``turns`` turns of
    ``new_tokens`` each: the prompt, every turn closed by its end-of-turn token and the longest
    reply of ``task``, then the answer scored after the last reply."""
    longest_reply = max(len(reply_tokens(tokenizer, text)) for text in TASKS[task].replies)
    answer = len(tokenizer.encode(example.answer, add_special_tokens=False)) + 1
    return len(prompt_tokens(tokenizer, example)) + turns * (new_tokens + 1 + longest_reply) + answer


def check_episodes(spec: Spec, bad: KeyCheck, context: int, tokenizer: Tokenizer,
                   eval_set: Sequence[Example]) -> None:
    """An episode grows by a turn and a reply at a time: the longest one, of an eval prompt (the
    task's training prompts are of the same form), must fit ``context`` (runner.preflight)."""
    turns = spec.recipe.settings.turns
    for key, new_tokens in (("sampling.max_tokens", spec.sampling.max_tokens),
                            ("recipe.max_tokens", spec.recipe.settings.max_tokens)):
        for i, example in enumerate(eval_set):
            n = episode_budget(spec.task.name, turns, tokenizer, example, new_tokens)
            if n > context:
                raise bad(key, f"an episode of eval prompt {i + 1} may take {n} tokens ({turns} turns of "
                               f"{new_tokens} tokens with the task's replies), more than the model's context of "
                               f"{context}; lower recipe.turns or {key}")


RECIPE = Recipe("igpo", train_step, Settings, play_eval=play_eval, check_context=check_episodes)
