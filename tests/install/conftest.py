"""Environments holding firetitan-track as a user installs it (tests/envs.py builds them once
and reuses them), and a way to run things there that knows nothing of this checkout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.envs import ROOT, build_env, install_project, project_wheel

HERE = Path(__file__).resolve().parent
USER_REQUIREMENTS = HERE / "user-requirements.txt"
# what the core must never bring: the local service's stack, the runner's, MLflow, the SDK itself
HEAVY = {"torch", "transformers", "peft", "starlette", "uvicorn", "mlflow", "optuna", "fireworks-ai", "tinker", "numpy"}


@pytest.fixture(scope="session")
def wheel() -> Path:
    return project_wheel()


@pytest.fixture(scope="session")
def core_bin(wheel: Path) -> Path:
    """A fresh environment holding nothing but ``pip install firetitan-track``: the core's closure."""
    return install_project(None, ())


@pytest.fixture(scope="session")
def user_core_bin(wheel: Path) -> Path:
    """A researcher's own environment (their SDK, fireworks-ai 1.2.30, and transformers; no
    torch) with the core of firetitan-track installed into it."""
    return install_project(build_env("user", USER_REQUIREMENTS), ())


@pytest.fixture(scope="session")
def postgres_bin(wheel: Path) -> Path:
    """A fresh environment holding nothing but ``firetitan-track[postgres]``."""
    return install_project(None, ("postgres",))


def outside(bin: Path, program: str, *args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``program`` from ``bin`` in ``cwd`` (outside the checkout), with no PYTHONPATH, no
    virtualenv and no FIRETITAN_* variable of the test run: only what the environment holds."""
    assert not cwd.resolve().is_relative_to(ROOT)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTHON", "FIRETITAN_")) and k != "VIRTUAL_ENV"}
    env["PATH"] = f"{bin}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run([str(bin / program), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def run_program(bin: Path, name: str, *args: str, cwd: Path) -> dict[str, Any]:
    """Copy programs/NAME into ``cwd`` and run it there with ``bin``'s python; its last line (JSON)."""
    cwd.mkdir(parents=True, exist_ok=True)
    shutil.copy(HERE / "programs" / name, cwd / name)
    done = outside(bin, "python", name, *args, cwd=cwd)
    assert done.returncode == 0, done.stderr[-4000:]
    report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return report
