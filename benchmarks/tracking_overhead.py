"""What recording costs, and how fast a crashed run is back to training.

Prints one JSON object:

- ``tracked_vs_bare_wall_ratio``: one research loop (SFT steps on the demo model,
  a snapshot + hot load + eval and a DCP save every 25 steps, the demo's cadence) run through
  ``track(service)`` against the same loop on the bare SDK, on the same local
  service, timed from the first step to the last (provisioning builds models and
  costs the same either way); rounds are interleaved and the median of the
  per-round ratios is reported. Target: <= 1.03.
- ``lora_tracked_vs_bare_wall_ratio``: the same for the LoRA demo (examples/reverse_lora.toml:
  rank-64 adapters on the frozen base, a LoRA training shape, adapter snapshots). Target: <= 1.03.
- ``ledger_write_share`` / ``lora_ledger_write_share``: the median fraction of a tracked loop's
  wall time spent inside the ledger's writes (appends and blobs). On a loaded machine the wall
  ratios swing with the service's share of the CPU; this part of the overhead does not.
- ``resume_to_next_step_s``: a demo run is SIGKILLed after a step; the wall time
  from launching ``firetitan-track resume`` to the next StepCompleted being
  durable (process start, imports, reconnect to the live trainer, state load,
  one step).
  ``resume_in_process_s`` is the part after the RunResumed event. With ``--resume-rounds N``
  (N > 1) the same run is resumed N times, each resumed process SIGKILLed once its first step
  is durable, and the medians are reported with every round's figure.

Usage: ``python benchmarks/tracking_overhead.py [--rounds N] [--steps N] [--skip-resume | --only-resume]
[--resume-rounds N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BASE_MODEL = "accounts/fireworks/models/qwen3-8b"
SHAPE = "accounts/fireworks/trainingShapes/ts-qwen3-8b-policy"
LORA_SHAPE = "accounts/fireworks/trainingShapes/ts-qwen3-8b-lora"
LORA_RANK = 64  # examples/reverse_lora.toml
EVAL_EVERY = SAVE_EVERY = 25  # the demo spec's cadence (examples/reverse_sft.toml)


def one_loop(info, ledger_url: str | None, steps: int, tag: str, lora_rank: int = 0) -> tuple[float, float]:
    """The seed's loop; with ``ledger_url`` the service is wrapped by ``track`` (the only difference)."""
    import torch
    from fireworks.training.sdk import AdamParams, Datum, FiretitanServiceClient, ModelInput, TensorData
    from fireworks.training.sdk.concurrency import AdaptiveConcurrencyController
    from transformers import AutoTokenizer

    from firetitan_track import track
    from runner.tasks import eval_examples, train_batch

    tokenizer = AutoTokenizer.from_pretrained(info.tokenizer_path)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")

    def datum(ex):
        prompt = tokenizer.apply_chat_template(ex.chat(), add_generation_prompt=True, tokenize=True,
                                               return_dict=False)
        full = list(prompt) + tokenizer.encode(ex.answer) + [im_end]
        w = torch.zeros(len(full) - 1)
        w[len(prompt) - 1:] = 1.0
        return Datum(model_input=ModelInput.from_ints(full[:-1]),
                     loss_fn_inputs={"target_tokens": TensorData.from_torch(torch.tensor(full[1:])),
                                     "weights": TensorData.from_torch(w)})

    evals = eval_examples("reverse", seed=0, count=16, digits=4)
    writes = [0.0]  # seconds inside the ledger's writes (tracked loops only)
    service = FiretitanServiceClient.from_firetitan_config(
        api_key="local", base_url=info.base_url, base_model=BASE_MODEL, tokenizer_model=info.tokenizer_path,
        lora_rank=lora_rank, training_shape_id=LORA_SHAPE if lora_rank else SHAPE, deployment_id=f"bench-{tag}",
        learning_rate=1e-3, replica_count=1,
        cleanup_trainer_on_close=True, cleanup_deployment_on_close="delete")
    if ledger_url:
        service = track(service, run_id=f"bench-{tag}", ledger_url=ledger_url)
        _time_writes(service._rec.ledger, writes)
    training = service.create_training_client(lora_rank=lora_rank)
    start = time.perf_counter()  # provisioning builds models: the same either way, and noisy
    for step in range(1, steps + 1):
        batch, _ = train_batch("reverse", None, seed=0, step=step, size=16, digits=4)
        training.forward_backward([datum(ex) for ex in batch], "cross_entropy").result()
        training.optim_step(AdamParams(learning_rate=1e-3)).result()
        if step % EVAL_EVERY == 0:
            saved = training.save_weights_for_sampler(f"s{step}").result()
            sampler = service.create_deployment_sampler(model_path=saved.path, tokenizer=tokenizer,
                                                        concurrency_controller=AdaptiveConcurrencyController())

            async def sample_all():
                return await asyncio.gather(*(sampler.sample_with_tokens(
                    messages=ex.chat(), n=1, max_tokens=8, temperature=0.0) for ex in evals))

            outs = asyncio.run(sample_all())
            score = sum(o[0].text.startswith(ex.answer) for ex, o in zip(evals, outs)) / len(evals)
            if ledger_url:
                service.log_score(score)
        if step % SAVE_EVERY == 0:
            training.save_state(f"state-{step}").result()
    elapsed = time.perf_counter() - start
    service.close()
    return elapsed, writes[0]


def _time_writes(ledger, total: list[float]) -> None:
    """Add the time of every ledger append and blob write to ``total[0]``."""
    for name in ("append", "put_json"):
        original = getattr(ledger, name)

        def timed(*args, _original=original, **kwargs):
            t0 = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                total[0] += time.perf_counter() - t0

        setattr(ledger, name, timed)


def overhead(info, rounds: int, steps: int, tmp: Path, lora_rank: int = 0) -> dict:
    ledger_url = f"sqlite:///{tmp / f'bench-ledger-{lora_rank}.db'}"
    kind = f"lora{lora_rank}" if lora_rank else "full"
    one_loop(info, None, 5, f"warm-{kind}", lora_rank)  # model build and first-touch costs out of the timings
    ratios, bare_s, tracked_s, shares = [], [], [], []
    for r in range(rounds):
        # alternate which goes first, so drift in the machine's load favours neither
        order = [("bare", None), ("tracked", ledger_url)] if r % 2 == 0 else [("tracked", ledger_url), ("bare", None)]
        runs = {name: one_loop(info, url, steps, f"{name}-{kind}-{r}", lora_rank) for name, url in order}
        times = {name: elapsed for name, (elapsed, _) in runs.items()}
        bare_s.append(times["bare"])
        tracked_s.append(times["tracked"])
        ratios.append(times["tracked"] / times["bare"])
        shares.append(runs["tracked"][1] / times["tracked"])
    return {"tracked_vs_bare_wall_ratio": round(statistics.median(ratios), 4),
            "tracked_vs_bare_ratios": [round(x, 4) for x in ratios],
            "bare_loop_s_median": round(statistics.median(bare_s), 3),
            "tracked_loop_s_median": round(statistics.median(tracked_s), 3),
            "ledger_write_share": round(statistics.median(shares), 4),
            "loop_steps": steps}


def resume_latency(info, tmp: Path, rounds: int = 1) -> dict:
    from firetitan_track import Ledger

    ledger_url = f"sqlite:///{tmp / 'resume-ledger.db'}"
    spec = tmp / "resume.toml"
    # The demo spec on this service, saving state every step: each StepCompleted is then
    # written right away (with the save's intent) rather than deferred, so its time is exact.
    spec.write_text((REPO / "examples" / "reverse_sft.toml").read_text().replace(
        '[backend]\nkind = "local"', f'[backend]\nkind = "local"\nbase_url = "{info.base_url}"').replace(
        "save_every = 25", "save_every = 1"))
    harness = REPO / "tests" / "runner" / "crash_harness.py"
    env = {**os.environ, "CRASH_AT": "event:StepCompleted:12"}
    crashed = subprocess.run([sys.executable, str(harness), "--ledger", ledger_url, "run", str(spec), "--run-id", "r",
                              "--quiet"], env=env, cwd=REPO, capture_output=True, text=True)
    if crashed.returncode != -9:
        raise RuntimeError(f"the run to resume was not SIGKILLed (exit {crashed.returncode}): {crashed.stderr[-2000:]}")
    ledger = Ledger.open(ledger_url)
    total, in_process = [], []
    for r in range(rounds):
        # every round but the last is SIGKILLed once its first step and state are durable: the next
        # resumes after a crash again
        env["CRASH_AT"] = "event:StateSaved:1"
        if r == rounds - 1:
            env.pop("CRASH_AT")
        seen = ledger.stream_version("r")  # the version this round's first event gets
        launched = time.time()
        proc = subprocess.Popen([sys.executable, str(harness), "--ledger", ledger_url, "resume", "r", "--quiet"],
                                env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        resumed_at = first_step_at = None
        while first_step_at is None:
            exited = proc.poll() is not None  # read once more after it exits: it may die right after its step
            resumed_at = None  # each poll reads this round's events from the start
            for ev in ledger.read("r", from_version=seen):
                if ev.type == "RunResumed":
                    resumed_at = ev.recorded_at
                elif ev.type == "StepCompleted" and resumed_at is not None:
                    first_step_at = ev.recorded_at
                    break
            if exited:
                break
            time.sleep(0.01)
        proc.wait()
        if first_step_at is None:
            raise RuntimeError("resume never completed a step")
        total.append(first_step_at - launched)
        in_process.append(first_step_at - resumed_at)
    result = {"resume_to_next_step_s": round(statistics.median(total), 3),
              "resume_in_process_s": round(statistics.median(in_process), 3)}
    if rounds > 1:
        result.update({"resume_to_next_step_rounds_s": [round(x, 3) for x in total],
                       "resume_in_process_rounds_s": [round(x, 3) for x in in_process]})
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=50)
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--skip-resume", action="store_true", help="Leave out the resume-latency figures.")
    only.add_argument("--only-resume", action="store_true", help="Only the resume-latency figures.")
    parser.add_argument("--resume-rounds", type=int, default=1, help="Resume the crashed run this many times.")
    args = parser.parse_args()
    logging.disable(logging.WARNING)

    from runner.local.supervisor import local_service

    with tempfile.TemporaryDirectory() as tmp, local_service() as info:
        result: dict = {}
        if not args.only_resume:
            result = overhead(info, args.rounds, args.steps, Path(tmp))
            lora = overhead(info, args.rounds, args.steps, Path(tmp), lora_rank=LORA_RANK)
            result.update({f"lora_{k}": v for k, v in lora.items() if k != "loop_steps"})
        if not args.skip_resume:
            result.update(resume_latency(info, Path(tmp), args.resume_rounds))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
