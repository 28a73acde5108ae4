"""The CLI as separate "machines": each its own process, TMPDIR and working directory."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers import HARNESS, REPO

LEASE_TTL_S = "5"  # a dead writer's lease (PostgreSQL) frees after this; live ones renew every third


def machine(tmp_path: Path, name: str) -> dict[str, str]:
    """Environment and cwd of one "machine": its own TMPDIR and working directory."""
    home = tmp_path / name
    (home / "tmp").mkdir(parents=True, exist_ok=True)
    return {"cwd": str(home), "TMPDIR": str(home / "tmp")}


def start(ledger_url: str, where: dict[str, str], *args: str, crash_at: str | None = None,
          crash_signal: str = "KILL", worker_crash_at: str | None = None,
          worker_crash_once: str | None = None) -> subprocess.Popen:
    """The CLI in its own process; ``worker_crash_at`` kills a sweep's worker process instead
    (the first to reach the point, with ``worker_crash_once``: see tests/runner/crash_harness.py)."""
    env = {**os.environ, "TMPDIR": where["TMPDIR"], "FIRETITAN_LEASE_TTL_S": LEASE_TTL_S,
           "PYTHONPATH": str(REPO)}
    for name in ("CRASH_AT", "CRASH_WORKER_AT", "CRASH_WORKER_ONCE"):
        env.pop(name, None)
    if crash_at:
        env.update(CRASH_AT=crash_at, CRASH_SIGNAL=crash_signal)
    if worker_crash_at:
        env.update(CRASH_WORKER_AT=worker_crash_at, CRASH_SIGNAL=crash_signal, CRASH_WORKER_ONCE=worker_crash_once or "")
    return subprocess.Popen([sys.executable, str(HARNESS), "--ledger", ledger_url, *args], cwd=where["cwd"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out + err


def wait_stopped(proc: subprocess.Popen, timeout: float = 120) -> None:
    """Wait until ``proc`` stopped itself (CRASH_SIGNAL=STOP at its crash point)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            raise AssertionError(f"process exited before its pause point: {finish(proc)}") from None
        if state == "T":
            return
        if proc.poll() is not None:
            raise AssertionError(f"process exited before its pause point: {finish(proc)}")
        time.sleep(0.05)
    raise AssertionError("process never reached its pause point")
