"""Fixtures for recording programs: each SDK release's environment with firetitan-track in it,
and the ``record`` command in its own process.

A recorded program runs in its own environment: the project's ``.venv`` (fireworks-ai 1.2.30)
or the cookbook's (1.2.24 with tinker 0.23, tests/envs.py) with the core of firetitan-track
installed from a wheel of this checkout, as a researcher installs it there
(``cookbook_core_bin``: an environment derived from the cookbook's, which stays as it is).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

# any key opens the local service; this one is masked wherever it would appear in the record
API_KEY = "fw_recorder_test_key_5d1c"

@pytest.fixture(scope="session")
def cookbook_recorder_bin(cookbook_core_bin: Path) -> Path:
    """The cookbook's environment (fireworks-ai 1.2.24, tinker 0.23), with the recorder in it."""
    return cookbook_core_bin


@pytest.fixture(scope="session")
def project_bin() -> Path:
    """The project's own environment (fireworks-ai 1.2.30)."""
    return Path(sys.executable).parent


def record(ledger_url: str, *args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
           timeout: float = 600) -> subprocess.CompletedProcess:
    """``firetitan-track --ledger URL record ARGS...`` in its own process."""
    exe = Path(sys.executable).parent / "firetitan-track"
    full_env = {**os.environ, "FIREWORKS_API_KEY": API_KEY, **(env or {})}
    return subprocess.run([str(exe), "--ledger", ledger_url, "record", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=cwd)


@pytest.fixture(scope="session")
def recorder_helpers() -> Any:
    from types import SimpleNamespace

    return SimpleNamespace(record=record)

