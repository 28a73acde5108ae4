"""Synthetic run streams written through the real ledger, shaped like the runner's.

A run trains ``steps`` steps; every ``every`` steps it saves its state, takes a
sampler snapshot (the first a base, later ones deltas on it), syncs it and
evaluates it on one prompt set. ``resume`` supersedes what followed the last
saved state, as the runner's resume does.
"""

from __future__ import annotations

from typing import Any

from firetitan_track import Ledger, RecordedEvent, new_event
from firetitan_track.projections.run_state import fold, to_supersede
from runner.spec import Spec

PROMPTS = [{"messages": [{"role": "user", "content": f"reverse {i}{i + 1}{i + 2}"}],
            "answer": f"{i + 2}{i + 1}{i}"} for i in range(5)]
SAMPLING = {"n": 1, "max_tokens": 8, "temperature": 0.0}


def demo_spec(lr: float = 1e-3, **sections: dict[str, Any]) -> dict[str, Any]:
    """A spec as a run records it, built by the real Spec (an unknown key fails here)."""
    raw = {"run": {"name": "demo", "steps": 8, "seed": 7},
           "model": {"base_model": "accounts/fireworks/models/qwen3-8b", "lora_rank": 8},
           "optim": {"learning_rate": lr, "beta1": 0.9, "beta2": 0.95},
           "schedule": {"eval_every": 2, "save_every": 2}, "eval": {"prompts": "builtin"}}
    for name, keys in sections.items():
        raw[name] = {**raw.get(name, {}), **keys}
    return Spec.from_dict(raw, source="demo spec").to_dict()


class RunWriter:
    def __init__(self, ledger: Ledger, run_id: str) -> None:
        self.ledger = ledger
        self.run_id = run_id
        self.version = ledger.stream_version(run_id)
        self.base_path: str | None = None
        self.loss_scale = 1.0
        self.evals = 0

    def emit(self, type: str, **data: Any) -> RecordedEvent:
        [rec] = self.ledger.append(self.run_id, [new_event(type, **data)], self.version)
        self.version += 1
        return rec

    def start(self, spec: dict[str, Any] | None = None, **extra: Any) -> None:
        spec = spec or demo_spec()
        self.emit("RunStarted", spec=spec, spec_digest=self.ledger.put_json(spec), code_version="abc123",
                  seed=7, backend="local", **extra)
        self.emit("TrainerProvisioned", role="policy", trainer_job_id=f"job-{self.run_id}",
                  base_model="tiny-qwen3", shape="cpu", lora_rank=8, created=True)
        self.emit("DeploymentProvisioned", deployment_id=f"dep-{self.run_id}", base_model="tiny-qwen3",
                  created=True)

    def step(self, n: int, lr: float = 1e-3) -> None:
        self.emit("StepCompleted", step=n, data_cursor=4 * n, micro_batches=2,
                  metrics={"loss": self.loss_scale / n, "tokens": 64}, optimizer={"learning_rate": lr})

    def save_state(self, n: int) -> None:
        name = f"state-{n}"
        self.emit("StateSaveRequested", step=n, name=name, data_cursor=4 * n)
        self.emit("StateSaved", step=n, name=name, path=f"dcp/{self.run_id}/{name}", data_cursor=4 * n)

    def snapshot(self, n: int) -> str:
        name = f"sampler-{n}"
        path = f"snapshots/{self.run_id}/{name}"
        kind = "base" if self.base_path is None else "delta"
        self.emit("SnapshotRequested", step=n, name=name)
        self.emit("SnapshotSaved", step=n, name=name, path=path, kind=kind, base_path=self.base_path)
        self.base_path = self.base_path or path
        self.emit("SyncRequested", step=n, deployment_id=f"dep-{self.run_id}", snapshot_path=path)
        self.emit("WeightsSynced", step=n, deployment_id=f"dep-{self.run_id}", snapshot_path=path,
                  duration_s=0.25 + n / 100)
        return path

    def evaluate(self, n: int, path: str, score: float) -> None:
        self.evals += 1
        eval_id = f"{self.run_id}-eval-{self.evals}"
        prompts = self.ledger.put_json(PROMPTS)
        self.emit("EvalStarted", eval_id=eval_id, step=n, snapshot_path=path, prompt_set_digest=prompts,
                  prompt_count=len(PROMPTS), sampling=SAMPLING)
        completions = self.ledger.put_json([{"text": f"out-{n}-{i}"} for i in range(len(PROMPTS))])
        self.emit("SamplesRecorded", eval_id=eval_id, completions_digest=completions,
                  server_metrics={"prefill_queue_s": 0.01 * n}, concurrency_window=4)
        self.emit("EvalScored", eval_id=eval_id, step=n, snapshot_path=path, prompt_set_digest=prompts,
                  score=score, metrics={"exact_match": score})

    def train(self, first: int, last: int, every: int = 2, score=lambda n: n / 10) -> None:
        for n in range(first, last + 1):
            self.step(n)
            if n % every == 0:
                self.save_state(n)
                self.evaluate(n, self.snapshot(n), score(n))

    def resume(self) -> list[int]:
        """Supersede the training history after the last saved state; returns those versions."""
        events = self.ledger.read(self.run_id)
        state = fold(events).last_state
        dropped = to_supersede(events)
        self.emit("RunResumed", from_step=state.step, state_path=state.path,
                  superseded=dropped, attempt=2)
        # snapshots taken after the state are gone; the next one re-derives from the same base
        return dropped

    def complete(self, n: int, path: str | None) -> None:
        self.emit("RunCompleted", final_step=n, final_snapshot=path)


def write_run(ledger: Ledger, run_id: str, steps: int = 8, **start: Any) -> RunWriter:
    w = RunWriter(ledger, run_id)
    w.start(**start)
    w.train(1, steps)
    w.complete(steps, f"snapshots/{run_id}/sampler-{steps - steps % 2}")
    return w
