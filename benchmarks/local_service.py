"""Benchmark of the local service, driven through the unmodified fireworks SDK.

Prints one JSON object:

- ``train_step_ratio_vs_raw_torch``: a train step (``forward_backward`` with the
  built-in cross_entropy loss + ``optim_step``) through the SDK and the service,
  divided by the same step in an in-process torch loop (same model config and
  seed, same 32 x 64-token batch, AdamW with the same hyperparameters), measured
  in the same run with the two interleaved. Target: <= 1.5.
- ``sampling_speedup_adaptive_vs_sequential``: wall time of 64 completions sent
  one at a time, divided by the same 64 (same prompts, seeds and lengths) sent
  concurrently under the SDK's AdaptiveConcurrencyController, which the
  deployment batches; median over interleaved rounds, one controller kept across
  rounds as across RL steps (``sampling_speedup_first_round`` is the first round,
  from the controller's default window of 8). Target: >= 4.
- ``lora_train_step_ratio_vs_raw_peft``: the same train step on a LoRA trainer
  (rank ``LORA_RANK`` on ``LORA_MODEL``, the service's LoRA shape) through the SDK,
  divided by a plain peft + torch AdamW loop on the same model, rank, targets and
  batch, interleaved in the same run. Target: <= 1.3.
- ``lora_optimizer_state_fraction``: the bytes of optimizer state the service's
  LoRA trainer holds after its steps, divided by the bytes a full-parameter AdamW
  holds for the same model after one step (measured here, not computed).
  Target: <= 0.05.

Beside each train ratio, where the step's time over its baseline goes, as CPU ms per step
measured over the same steps: ``sdk_client_cpu_ms_per_step`` (this process during an SDK step:
the SDK building and sending its requests and reading their results; the baseline's model is
idle then), ``service_cpu_ms_per_step`` (the service's: HTTP, decoding the datums, the engine's
model work), ``baseline_cpu_ms_per_step`` (the baseline's model work) and
``service_cpu_over_baseline_ms`` (the service's minus the baseline's); ``lora_`` for LoRA.

Also printed: ``torch_threads`` (intra-op threads of this process; the service, started from
it, inherits ``OMP_NUM_THREADS``) and ``load_avg_1m`` before and after each part. On a shared
2-core machine, two intra-op threads per process spin-wait on each other whenever anything
else runs, and steps then take several times their idle time on both sides; with
``OMP_NUM_THREADS=1`` (for both sides alike) the ratios hold steady under such load.

Usage: ``[OMP_NUM_THREADS=1] python benchmarks/local_service.py [--device cpu|cuda] [--rounds N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BATCH, SEQ_LEN = 32, 64
# The LoRA figures use the largest stand-in: with hidden sizes this small, the adapter
# share of the parameters is 2r/hidden-ish, so rank 4 (not the SDK's usual 8+).
LORA_MODEL, LORA_SHAPE, LORA_RANK, LORA_ALPHA = ("accounts/fireworks/models/qwen3-4b",
                                                 "accounts/fireworks/trainingShapes/ts-qwen3-4b-lora", 4, 32)
LEARNING_RATE = 1e-4
COMPLETIONS, COMPLETION_TOKENS = 64, 32


def make_service(info, **overrides):
    """A service client configured as the seed configures it."""
    from fireworks.training.sdk import FiretitanServiceClient

    config = dict(api_key="local", base_url=info.base_url, base_model=info.base_model,
                  tokenizer_model=info.tokenizer_path, lora_rank=0, training_shape_id=info.training_shape_id,
                  learning_rate=LEARNING_RATE, replica_count=1, cleanup_trainer_on_close=True,
                  cleanup_deployment_on_close="delete")
    config.update(overrides)
    return FiretitanServiceClient.from_firetitan_config(**config)


def make_batch(vocab_size: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(256) for _ in range(SEQ_LEN + 1)] for _ in range(BATCH)]


def sdk_datums(sequences):
    from fireworks.training import tinker

    return [tinker.Datum(model_input=tinker.ModelInput.from_ints(seq[:-1]),
                         loss_fn_inputs={"target_tokens": tinker.TensorData(data=seq[1:], dtype="int64",
                                                                            shape=[SEQ_LEN])})
            for seq in sequences]


class RawTorchLoop:
    """The same step, written directly against torch (and, with ``lora_rank``, peft): the baseline."""

    def __init__(self, base_model: str, device: str, sequences, lora_rank: int = 0):
        import torch

        from runner.local import catalogue
        from runner.local.model import build_model

        self.torch = torch
        self.model = build_model(catalogue.resolve(base_model), seed=0, device=device)
        if lora_rank:
            from peft import LoraConfig, get_peft_model

            targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
            self.model = get_peft_model(self.model, LoraConfig(r=lora_rank, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                                               target_modules=targets))
        self.model.train()
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad],
                                           lr=LEARNING_RATE, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0)
        data = torch.tensor(sequences, dtype=torch.int64, device=device)
        self.inputs, self.targets = data[:, :-1], data[:, 1:]
        self.device = device

    def step(self) -> float:
        torch = self.torch
        logits = self.model(input_ids=self.inputs, use_cache=False).logits.float()
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, self.targets.unsqueeze(-1)).squeeze(-1)
        loss = -logprobs.sum()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        return float(loss.detach())

    def optimizer_state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for state in self.optimizer.state.values()
                   for t in state.values() if isinstance(t, self.torch.Tensor))


def process_cpu_s(pid: int) -> float:
    """CPU seconds all threads of process ``pid`` have run, to the nanosecond (the scheduler's
    own count, /proc/PID/task/*/schedstat; Linux)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, IndexError, ValueError):  # a thread that ended meanwhile
            pass
    return total / 1e9


def time_interleaved(sdk_step, raw_step, rounds: int, steps_per_round: int, service_pid: int) -> dict[str, float]:
    """Median ms of each step. The two alternate step by step, so a shared machine's
    load, which drifts over seconds, hits both alike; which goes first alternates by round,
    so neither always follows the other (whose threads may still be winding down).

    Beside the wall times, the CPU each side spends per step (means over the same steps, read
    outside the timed span): this process's during an SDK step is the SDK client's own (the
    baseline's model sits idle then), the service's during it is its HTTP handling and the
    engine's model work; the baseline's is its model work alone."""
    for _ in range(3):  # warm-up: allocator, autograd graph, connections
        sdk_step()
        raw_step()
    times: dict[str, list[float]] = {"sdk": [], "raw": []}
    cpu = {"sdk_client": 0.0, "service": 0.0, "raw": 0.0}
    for r in range(rounds):
        order = (("sdk", sdk_step), ("raw", raw_step))
        for _ in range(steps_per_round):
            for key, step in order if r % 2 == 0 else order[::-1]:
                own, served = time.process_time(), process_cpu_s(service_pid)
                start = time.perf_counter()
                step()
                times[key].append(time.perf_counter() - start)
                own, served = time.process_time() - own, process_cpu_s(service_pid) - served
                if key == "sdk":
                    cpu["sdk_client"] += own
                    cpu["service"] += served
                else:
                    cpu["raw"] += own
    steps = len(times["sdk"])
    return {"sdk_ms": 1e3 * statistics.median(times["sdk"]), "raw_ms": 1e3 * statistics.median(times["raw"]),
            "steps": steps, **{f"{key}_cpu_ms": 1e3 * value / steps for key, value in cpu.items()}}


def cpu_figures(m: dict[str, float], prefix: str) -> dict[str, float]:
    """Where an SDK step's time over the baseline's goes, in CPU ms per step: the SDK client's
    own, and the service's beyond the baseline's model work (HTTP, decoding, the engine)."""
    return {f"{prefix}sdk_client_cpu_ms_per_step": round(m["sdk_client_cpu_ms"], 2),
            f"{prefix}service_cpu_ms_per_step": round(m["service_cpu_ms"], 2),
            f"{prefix}baseline_cpu_ms_per_step": round(m["raw_cpu_ms"], 2),
            f"{prefix}service_cpu_over_baseline_ms": round(m["service_cpu_ms"] - m["raw_cpu_ms"], 2)}


def sdk_train_step(service, datums):
    from fireworks.training import tinker

    training = service.create_training_client()
    adam = tinker.AdamParams(learning_rate=LEARNING_RATE, beta1=0.9, beta2=0.95, eps=1e-12)

    def step() -> None:
        training.forward_backward(datums, "cross_entropy").result()
        training.optim_step(adam).result()
    return step


def bench_training(info, device: str, rounds: int, steps_per_round: int) -> dict:
    service = make_service(info, deployment_id="bench-train")
    try:
        sequences = make_batch(259)
        sdk_step = sdk_train_step(service, sdk_datums(sequences))
        raw = RawTorchLoop(info.base_model, device, sequences)
        m = time_interleaved(sdk_step, raw.step, rounds, steps_per_round, info.pid)
        return {"train_step_ratio_vs_raw_torch": round(m["sdk_ms"] / m["raw_ms"], 3),
                "sdk_train_step_ms": round(m["sdk_ms"], 2), "raw_torch_train_step_ms": round(m["raw_ms"], 2),
                "train_steps_measured": m["steps"], **cpu_figures(m, "")}
    finally:
        service.close()


def bench_lora(info, device: str, rounds: int, steps_per_round: int) -> dict:
    import httpx

    service = make_service(info, deployment_id="bench-lora", base_model=LORA_MODEL, lora_rank=LORA_RANK,
                           lora_alpha=LORA_ALPHA, training_shape_id=LORA_SHAPE)
    try:
        sequences = make_batch(259, seed=1)
        sdk_step = sdk_train_step(service, sdk_datums(sequences))
        raw = RawTorchLoop(LORA_MODEL, device, sequences, lora_rank=LORA_RANK)
        m = time_interleaved(sdk_step, raw.step, rounds, steps_per_round, info.pid)
        # What the service's LoRA trainer holds, against a full-parameter AdamW on the same model.
        held = httpx.get(f"{info.base_url}/training/v1/rlorTrainerJobs/local/{service.trainer_job_id}"
                         "/api/v1/local/optimizer", timeout=60).json()
        full = RawTorchLoop(LORA_MODEL, device, sequences[:2])
        full.step()
        return {"lora_train_step_ratio_vs_raw_peft": round(m["sdk_ms"] / m["raw_ms"], 3),
                "lora_sdk_train_step_ms": round(m["sdk_ms"], 2), "raw_peft_train_step_ms": round(m["raw_ms"], 2),
                "lora_train_steps_measured": m["steps"], **cpu_figures(m, "lora_"),
                "lora_optimizer_state_fraction": round(held["optimizer_state_bytes"] / full.optimizer_state_bytes(), 4),
                "lora_optimizer_state_bytes": held["optimizer_state_bytes"],
                "full_optimizer_state_bytes": full.optimizer_state_bytes(),
                "lora": {"base_model": LORA_MODEL, "rank": LORA_RANK, "alpha": LORA_ALPHA}}
    finally:
        service.close()


def bench_sampling(info, rounds: int = 3) -> dict:
    from fireworks.training.sdk.concurrency import AdaptiveConcurrencyController

    service = make_service(info, deployment_id="bench-sampling")
    try:
        service.create_training_client()
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(info.tokenizer_path)
        prompt = list(tokenizer.apply_chat_template([{"role": "user", "content": "Tell me a story."}], tokenize=True,
                                                    add_generation_prompt=True, return_dict=False))
        controller = AdaptiveConcurrencyController()
        sampler = service.create_deployment_sampler(tokenizer=tokenizer, concurrency_controller=controller)

        async def one(seed: int):
            # Full-distribution sampling with a per-request seed: both runs generate the same tokens.
            return (await sampler.sample_with_prompt_tokens(prompt, n=1, max_tokens=COMPLETION_TOKENS,
                                                            temperature=1.0, seed=seed))[0]

        async def sequential():
            return [await one(seed) for seed in range(COMPLETIONS)]

        async def adaptive():
            return await asyncio.gather(*(one(seed) for seed in range(COMPLETIONS)))

        asyncio.run(sequential_warmup(one))
        seq_times, ada_times = [], []
        for _ in range(rounds):  # interleaved pairs, so machine load hits both alike
            start = time.perf_counter()
            seq_results = asyncio.run(sequential())
            seq_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            ada_results = asyncio.run(adaptive())
            ada_times.append(time.perf_counter() - start)
            controller.step_completed()  # as an RL loop does between steps; the window carries over
            assert [c.full_tokens for c in seq_results] == [c.full_tokens for c in ada_results], "runs differ"
        seq_s, ada_s = statistics.median(seq_times), statistics.median(ada_times)
        tokens = sum(c.completion_len for c in ada_results)
        return {"sampling_speedup_adaptive_vs_sequential": round(seq_s / ada_s, 3),
                # The first round starts from the controller's defaults (window 8).
                "sampling_speedup_first_round": round(seq_times[0] / ada_times[0], 3),
                "sequential_seconds": round(seq_s, 3), "adaptive_seconds": round(ada_s, 3),
                "sampling_rounds": rounds, "completions": COMPLETIONS, "completion_tokens_total": tokens,
                "adaptive_window_after": controller.window_size}
    finally:
        service.close()


async def sequential_warmup(one) -> None:
    for seed in range(4):
        await one(1000 + seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps-per-round", type=int, default=8)
    parser.add_argument("--skip", action="append", default=[], choices=["training", "lora", "sampling"],
                        help="leave out a part (repeatable)")
    args = parser.parse_args()
    logging.getLogger("fireworks").setLevel(logging.ERROR)

    import torch

    from runner.local.supervisor import local_service

    with local_service(device=args.device) as info:
        result = {"device": args.device, "base_model": info.base_model, "batch": [BATCH, SEQ_LEN],
                  "torch_threads": torch.get_num_threads(), "load_avg_1m": {"start": round(os.getloadavg()[0], 2)}}
        for part, bench in (("training", lambda: bench_training(info, args.device, args.rounds, args.steps_per_round)),
                            ("lora", lambda: bench_lora(info, args.device, args.rounds, args.steps_per_round)),
                            ("sampling", lambda: bench_sampling(info, args.rounds))):
            if part in args.skip:
                continue
            result.update(bench())
            result["load_avg_1m"][part] = round(os.getloadavg()[0], 2)
    result["targets"] = {"train_step_ratio_vs_raw_torch": "<= 1.5", "sampling_speedup_adaptive_vs_sequential": ">= 4",
                         "lora_train_step_ratio_vs_raw_peft": "<= 1.3", "lora_optimizer_state_fraction": "<= 0.05"}
    print(json.dumps(result))

if __name__ == "__main__":
    main()
