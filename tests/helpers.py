"""Helpers for tests that drive the runner: a small spec, and the CLI in its own process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HARNESS = Path(__file__).resolve().parent / "runner" / "crash_harness.py"
REPO = Path(__file__).resolve().parents[1]

POSTGRES_URL = os.environ.get("FIRETITAN_TEST_POSTGRES_URL")
needs_postgres = pytest.mark.skipif(
    not POSTGRES_URL, reason="FIRETITAN_TEST_POSTGRES_URL is not set (e.g. "
                             "postgresql+psycopg://postgres@127.0.0.1:5432/test); PostgreSQL tests skipped")


def small_spec(tmp_path: Path, base_url: str, name: str = "small", **sections: dict) -> Path:
    """A short SFT run on the tiny model: 4 steps, a state every 2, an eval every 2."""
    body = {
        "run": {"name": name, "seed": 7, "steps": 4},
        "backend": {"kind": "local", "base_url": base_url},
        "model": {"base_model": "local/tiny-qwen3", "training_shape": "ts-local-tiny",
                  "deployment_id": f"dep-{name}"},
        "recipe": {"kind": "sft", "batch_size": 8},
        "task": {"name": "reverse", "digits": 3},
        "optim": {"learning_rate": 3e-3},
        "schedule": {"save_every": 2, "eval_every": 2},
        "eval": {"count": 8},
        "sampling": {"max_tokens": 5},
        "concurrency": {"mode": "fixed", "initial": 8, "max": 8},
    }
    for key, value in sections.items():
        body.setdefault(key, {}).update(value)
    lines = []
    for section, values in body.items():
        lines.append(f"[{section}]")
        for k, v in values.items():
            lines.append(f"{k} = {v!r}".replace("'", '"') if isinstance(v, str) else f"{k} = {v}")
    path = tmp_path / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def completed_run(tmp_path_factory: pytest.TempPathFactory, local_url: str, name: str, run_id: str,
                  **sections: dict) -> tuple[Path, str]:
    """A module's uninterrupted reference run, in this process: ``small_spec`` with ``sections``
    (named ``name``) run to completion as ``run_id`` into a SQLite ledger of its own. Returns
    (the spec's path, the ledger URL)."""
    from runner.loop import run_spec
    from runner.spec import load_spec

    tmp = tmp_path_factory.mktemp(f"{name}-run")
    url = f"sqlite:///{tmp}/ledger.db"
    spec = small_spec(tmp, local_url, name=name, **sections)
    assert run_spec(load_spec(spec), ledger_url=url, run_id=run_id, progress=False).status == "completed"
    return spec, url


def cli(ledger_url: str, *args: str, crash_at: str | None = None, crash_signal: str = "KILL",
        timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the firetitan-track CLI in its own process (optionally signalled, SIGKILL by
    default, at a chosen point: see tests/runner/crash_harness.py)."""
    full_env = {**os.environ, **(env or {})}
    full_env.pop("CRASH_AT", None)
    if crash_at:
        full_env["CRASH_AT"] = crash_at
        full_env["CRASH_SIGNAL"] = crash_signal
    return subprocess.run([sys.executable, str(HARNESS), "--ledger", ledger_url, *args], capture_output=True,
                          text=True, timeout=timeout, env=full_env, cwd=REPO)


def trainer_state(base_url: str, job_id: str) -> str:
    """A trainer job's state as the service's control plane reports it."""
    from fireworks.training.sdk import TrainerJobManager

    return str(TrainerJobManager(api_key="local", base_url=base_url).get(job_id).get("state", ""))
