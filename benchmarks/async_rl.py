"""What async GRPO buys, and what recording it costs.

Prints one JSON object:

- ``async_vs_sync_grpo_wall_ratio``: the runner's ``async_grpo`` at
  ``max_offpolicy_versions = 2`` against ``grpo`` (on-policy: sync, sample, train in turn),
  the same spec otherwise (steps, prompts, rollouts per prompt, rollout length), on one local
  service; each timed from the state saved at step 0 to the last step's StepCompleted (the
  ledger's own timestamps: provisioning and the baseline eval cost the same either way).
  Rounds alternate which goes first; the median of the per-round ratios is reported. Below 1
  where sampling and training overlap: async_grpo trains step s while the deployment samples
  the rollouts of step s+2, where grpo waits for each in turn.
- ``tracked_vs_bare_wall_ratio``: the async loop (async_grpo's train_step and publish, one
  step after another) through ``TrackedService`` with every step's rollouts, StepCompleted and
  syncs recorded, against the same calls on the bare SDK with nothing recorded. Target <= 1.03.

Usage: ``python benchmarks/async_rl.py [--rounds N] [--steps N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BASE_MODEL = "accounts/fireworks/models/qwen3-8b"
SHAPE = "ts-qwen3-8b-policy"
RECIPE = {"batch_size": 16, "group_size": 8, "max_tokens": 2, "temperature": 1.0}  # examples/add_async_grpo.toml


def spec_dict(kind: str, base_url: str, steps: int, tag: str) -> dict:
    recipe = {"kind": kind, **RECIPE, **({"max_offpolicy_versions": 2} if kind == "async_grpo" else {})}
    return {"run": {"name": tag, "seed": 0, "steps": steps},
            "backend": {"kind": "local", "base_url": base_url},
            "model": {"base_model": BASE_MODEL, "training_shape": SHAPE, "deployment_id": tag},
            "recipe": recipe, "task": {"name": "add", "digits": 1}, "optim": {"learning_rate": 1e-3},
            "schedule": {"save_every": steps, "eval_every": steps}, "eval": {"count": 8},
            "sampling": {"max_tokens": 4}, "concurrency": {"mode": "fixed", "initial": 32, "max": 32}}


def runner_loop_s(kind: str, base_url: str, steps: int, tmp: Path, tag: str) -> float:
    """One run of the runner; the seconds from state 0 to the last step's record."""
    from firetitan_track import Ledger
    from runner.loop import run_spec
    from runner.spec import Spec

    url = f"sqlite:///{tmp / (tag + '.db')}"
    assert run_spec(Spec.from_dict(spec_dict(kind, base_url, steps, tag)), ledger_url=url, run_id=tag,
                    progress=False).status == "completed"
    events = Ledger.open(url).read(tag)
    start = next(ev.recorded_at for ev in events if ev.type == "StateSaved")
    end = [ev.recorded_at for ev in events if ev.type == "StepCompleted"][-1]
    return end - start


def async_loop_s(info, ledger_url: str | None, steps: int, tag: str) -> float:
    """async_grpo's steps on the bare SDK, or (``ledger_url``) recorded as the runner records them."""
    from fireworks.training.sdk import FiretitanServiceClient
    from fireworks.training.sdk.concurrency import FixedConcurrencyController
    from transformers import AutoTokenizer

    from firetitan_track import Ledger
    from firetitan_track.events import StepCompleted
    from firetitan_track.tracking import Recorder, TrackedService, adam_params
    from runner.recipes import async_grpo
    from runner.recipes.base import StepContext
    from runner.spec import Spec
    from runner.tasks import train_batch

    spec = Spec.from_dict(spec_dict("async_grpo", info.base_url, steps, tag))
    service = FiretitanServiceClient.from_firetitan_config(
        api_key="local", base_url=info.base_url, base_model=BASE_MODEL, tokenizer_model=info.tokenizer_path,
        lora_rank=0, training_shape_id=f"accounts/fireworks/trainingShapes/{SHAPE}", deployment_id=tag,
        learning_rate=1e-3, replica_count=1, cleanup_trainer_on_close=True, cleanup_deployment_on_close="delete")
    rec = None
    if ledger_url:
        rec = Recorder(Ledger.open(ledger_url), tag)
        service = TrackedService(service, rec, base_model=BASE_MODEL, shape=SHAPE, lora_rank=0, deployment_id=tag)
    policy = service.create_training_client(lora_rank=0)
    loop = asyncio.new_event_loop()
    size = spec.recipe.batch_size
    ctx = StepContext(spec, service, policy, None, AutoTokenizer.from_pretrained(info.tokenizer_path),
                      adam=adam_params(dataclasses.asdict(spec.optim)), loop=loop,
                      new_controller=lambda: FixedConcurrencyController(32), rec=rec,
                      batch_of=lambda s: train_batch("add", None, seed=0, step=s, size=size, digits=1)[0])
    ctx.sync_policy("v0", trained_through=0)  # version 0 on the deployment, as the runner's baseline eval leaves it
    start = time.perf_counter()
    for step in range(1, steps + 1):
        ctx.step = step
        ctx.step_record = {}
        batch, cursor = train_batch("add", None, seed=0, step=step, size=size, digits=1)
        if rec is not None:
            rec.step = step
        metrics = async_grpo.train_step(ctx, batch)
        if rec is not None:
            rec.record(StepCompleted(step=step, data_cursor=cursor, micro_batches=1, metrics=metrics,
                                     optimizer=dataclasses.asdict(spec.optim), **ctx.step_record), defer=True)
        async_grpo.publish(ctx)
    elapsed = time.perf_counter() - start
    loop.close()
    service.close()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    logging.disable(logging.WARNING)

    from runner.local.supervisor import local_service

    with tempfile.TemporaryDirectory() as tmp_dir, local_service() as info:
        tmp = Path(tmp_dir)
        async_loop_s(info, None, 2, "warm")  # model build and first-touch costs out of the timings
        sync_s, async_s, speed = [], [], []
        bare_s, tracked_s, overhead = [], [], []
        for r in range(args.rounds):
            kinds = ["grpo", "async_grpo"] if r % 2 == 0 else ["async_grpo", "grpo"]
            took = {k: runner_loop_s(k, info.base_url, args.steps, tmp, f"{k.replace('_', '-')}-{r}") for k in kinds}
            sync_s.append(took["grpo"])
            async_s.append(took["async_grpo"])
            speed.append(took["async_grpo"] / took["grpo"])
            order = [("bare", None), ("tracked", f"sqlite:///{tmp / 'tracked.db'}")]
            loops = {name: async_loop_s(info, url, args.steps, f"{name}-{r}") for name, url in (order if r % 2 == 0 else order[::-1])}
            bare_s.append(loops["bare"])
            tracked_s.append(loops["tracked"])
            overhead.append(loops["tracked"] / loops["bare"])
    print(json.dumps({
        "async_vs_sync_grpo_wall_ratio": round(statistics.median(speed), 4),
        "async_vs_sync_ratios": [round(x, 4) for x in speed],
        "sync_grpo_loop_s_median": round(statistics.median(sync_s), 3),
        "async_grpo_loop_s_median": round(statistics.median(async_s), 3),
        "tracked_vs_bare_wall_ratio": round(statistics.median(overhead), 4),
        "tracked_vs_bare_ratios": [round(x, 4) for x in overhead],
        "bare_async_loop_s_median": round(statistics.median(bare_s), 3),
        "tracked_async_loop_s_median": round(statistics.median(tracked_s), 3),
        "steps": args.steps, "rollouts_per_step": RECIPE["batch_size"] * RECIPE["group_size"],
        "max_offpolicy_versions": 2,
    }))


if __name__ == "__main__":
    main()
