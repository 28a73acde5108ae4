"""Run one cookbook recipe through its own ``Config`` and ``main``, as ``training/examples/`` do.

    python recipe_driver.py RECIPE SPEC.json

RECIPE is a module of ``training.recipes`` (``sft_loop``, ``rl_loop``, ...). SPEC holds
``{"config": {...}}``: the recipe's ``Config`` fields, nested dataclasses (``trainer``,
``deployment``, ...) as objects, enums by value. The recipe talks to whatever
``FIREWORKS_BASE_URL`` names; this script adds nothing to the conversation. It runs in
the cookbook's own environment (fireworks-ai 1.2.24), with the cookbook on PYTHONPATH,
and is kept a plain script so another program can wrap the same command line (the
recorder: ``firetitan-track record -- python recipe_driver.py ...``).

What it sets beyond the Config is what the examples set, through the hooks each recipe
offers: a task's reward function (``rl_loop.reward_fn = ...`` as examples/rl/deepmath does),
a rollout (the rollout factory of examples/rl/single_turn_token_in for ``async_rl_loop``), an
eval (``async_rl_loop``'s ``evaluation_fn``, ``distillation_loop``'s ``Config.step_eval``),
plus the two work-arounds named below. The same command runs plain and under the recorder
(tests/cookbook/test_recipes.py).
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import itertools
import json
import logging
import sys
import typing
from pathlib import Path


def build(cls: type, values: dict, where: str = "config") -> object:
    """``cls(**values)``, with nested dataclass and enum fields built from plain JSON."""
    if not isinstance(values, dict):
        raise SystemExit(f"{where}: expected an object for {cls.__name__}, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise SystemExit(f"{where}: {cls.__name__} has no field(s) {unknown}")
    kwargs = {}
    for name, value in values.items():
        kind = _concrete(hints[name])
        if dataclasses.is_dataclass(kind) and isinstance(value, dict):
            value = build(kind, value, f"{where}.{name}")
        elif isinstance(kind, type) and issubclass(kind, enum.Enum) and not isinstance(value, kind):
            value = kind(value)
        kwargs[name] = value
    return cls(**kwargs)


def _concrete(hint: object) -> object:
    """The class inside ``X | None`` (or ``Optional[X]``); the hint itself otherwise."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, getattr(__import__("types"), "UnionType", None)) and len(args) == 1:
        return args[0]
    return hint


_graded = itertools.count()


def alternating_reward(completion: str, row: dict) -> float:
    """A grader standing in for a task's (as examples/rl/deepmath swaps in its own): 1 for
    every second completion graded. An untrained model never earns a real task's reward, and
    GRPO drops groups whose rewards are all equal; alternating keeps every group's signal."""
    return float(next(_graded) % 2)


def _mean_sampled_logprob(samples: list) -> float | None:
    """The mean log-probability the deployment gave the tokens it sampled: a number that
    depends on the weights it serves, which is what an eval tied to a snapshot must measure."""
    values = [float(v) for s in samples
              for v in (getattr(s, "inference_logprobs", None) or getattr(s, "sampling_logprobs", None) or [])
              if v is not None]
    return sum(values) / len(values) if values else None


async def async_rl_evaluation(step: int, rollout_fn) -> dict:
    """``async_rl_loop``'s ``evaluation_fn``: the recipe's own rollout on the first two rows, after
    each weight sync; reports the mean sampled log-probability of the completions."""
    runs = [await rollout_fn(row) for row in _EVAL_ROWS]
    logprobs = [lp for run in runs if run for seg in run.segments
                for lp, keep in zip(seg.logprobs, seg.loss_mask) if keep]
    return {"eval/sampled_logprob": sum(logprobs) / len(logprobs)} if logprobs else {}


def distillation_step_eval(context: dict) -> dict:
    """``distillation_loop``'s ``Config.step_eval`` (run after each weight sync): greedy samples of
    the student's deployment on the first two prompts, their mean sampled log-probability. (The
    cookbook's own trace-gap eval needs a teacher that writes ``Final:`` answers, which an
    untrained model never does.)"""
    import asyncio

    sampler = context["student_sampler"]

    async def sample_all() -> list:
        out = []
        for row in list(context["dataset"])[:2]:
            out += await sampler.sample_with_tokens(messages=row["messages"], n=1, max_tokens=8, temperature=0.0,
                                                    logprobs=True)
        return out

    value = _mean_sampled_logprob(asyncio.run(sample_all()))
    return {} if value is None else {"eval/student_sampled_logprob": value}


_EVAL_ROWS: list = []


def _skip_checkpoint_stabilize_wait() -> None:
    """Work-around, not a fix: after a DCP save with a data cursor, every recipe sleeps
    ``TrainingCheckpoints(save_stabilize_s=15.0)`` (training/utils/checkpoints.py) for the
    managed control plane to consolidate checkpoint rows; no recipe Config exposes it. The
    local service lists a save once it is written, so the tests wait 0 s (and poll every
    0.2 s instead of 3 s) to keep the suite short. Nothing in the recipe is edited."""
    from training.utils import checkpoints

    original = checkpoints.TrainingCheckpoints.__init__

    def init(self, *args, save_stabilize_s: float = 0.0, save_poll_s: float = 0.2, **kwargs):
        original(self, *args, save_stabilize_s=save_stabilize_s, save_poll_s=save_poll_s, **kwargs)

    checkpoints.TrainingCheckpoints.__init__ = init


def _fix_igpo_turn_advantages(module) -> None:
    """Work-around for a fault of the pinned cookbook commit, not of any server:
    igpo_loop.py line 583 calls ``compute_turn_advantages(rewards, gamma=...)``, the
    signature before training/utils/rl/igpo.py split IG and outcome rewards into two
    arguments (a TypeError on the managed service too). The recipe already summed both
    into one per-turn reward, so it is passed as the IG rewards with zero outcome rewards."""
    current = module.compute_turn_advantages

    def compute_turn_advantages(rewards, gamma: float = 0.95, **kwargs):
        return current(rewards, [[0.0] * len(turns) for turns in rewards], gamma=gamma, **kwargs)

    module.compute_turn_advantages = compute_turn_advantages


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        raise SystemExit(__doc__)
    recipe, spec_path = argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [%(levelname)s] %(name)s: %(message)s")
    spec = json.loads(Path(spec_path).read_text())
    module = importlib.import_module(f"training.recipes.{recipe}")
    config = build(module.Config, spec.get("config", {}))
    _skip_checkpoint_stabilize_wait()
    kwargs: dict = {}
    if recipe in ("rl_loop", "igpo_loop"):
        module.reward_fn = alternating_reward
    if recipe == "igpo_loop":
        _fix_igpo_turn_advantages(module)
    if recipe == "async_rl_loop":
        # The cookbook's own single-turn token-in rollout, as examples/rl/single_turn_token_in/train.py wires it.
        from training.examples.rl.single_turn_token_in.rollout import make_rollout_fn

        kwargs["rollout_fn_factory"] = make_rollout_fn
        with open(config.dataset) as rows:
            _EVAL_ROWS[:] = [json.loads(line) for line in rows][:2]
        kwargs["evaluation_fn"] = async_rl_evaluation
    if recipe == "distillation_loop":
        config.step_eval, config.step_eval_interval = distillation_step_eval, 1
    result = module.main(config, **kwargs)
    print(json.dumps({"recipe": recipe, "result": result}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
