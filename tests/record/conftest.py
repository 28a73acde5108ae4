"""Fixtures for recording programs: each SDK release's environment with firetitan-track in it,
and the ``record`` command in its own process.

A recorded program runs in its own environment: the project's ``.venv`` (fireworks-ai 1.2.30)
or the cookbook's (1.2.24 with tinker 0.23, tests/envs.py). The cookbook's is shared by
every test run and must not change, so the recorder goes into an environment derived from
it (``with_recorder``): a virtualenv that sees the cookbook environment's packages and has
this checkout installed without its dependencies, plus the few the core imports.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.envs import ROOT, base_python, envs_root

CORE_DEPS = ("sqlalchemy", "alembic", "click")  # what firetitan_track's ledger and recorder import
# any key opens the local service; this one is masked wherever it would appear in the record
API_KEY = "fw_recorder_test_key_5d1c"


def with_recorder(base_bin: Path) -> Path:
    """The ``bin`` of an environment that sees ``base_bin``'s packages (its SDK, torch, ...) and
    has this checkout installed in it, built once and kept under the test environments' folder.

    (The one place to swap for a packaged install of the core once the project has one.)
    """
    base_python_path = base_bin / "python"
    site = subprocess.run([str(base_python_path), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    key = hashlib.sha256(f"{site}\n{ROOT}\n{sys.version}\n{CORE_DEPS}".encode()).hexdigest()[:12]
    root = envs_root()
    root.mkdir(parents=True, exist_ok=True)
    home = root / f"recorder-{key}"
    with open(root / "recorder.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (home / ".ready").exists():
            subprocess.run([base_python(), "-m", "venv", "--clear", str(home)], check=True)
            purelib = subprocess.run([str(home / "bin" / "python"), "-c",
                                      "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                     capture_output=True, text=True, check=True).stdout.strip()
            # after this environment's own packages, the base environment's (its .pth files too)
            Path(purelib, "_base_environment.pth").write_text(f"import site; site.addsitedir({site!r})\n")
            pip = [str(home / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
            subprocess.run([*pip, "-c", str(ROOT / "requirements.lock"), *CORE_DEPS], check=True)
            subprocess.run([*pip, "--no-deps", "-e", str(ROOT)], check=True)
            (home / ".ready").write_text(site)
    return home / "bin"


@pytest.fixture(scope="session")
def cookbook_recorder_bin(cookbook_bin: Path) -> Path:
    """The cookbook's environment (fireworks-ai 1.2.24, tinker 0.23), with the recorder in it."""
    return with_recorder(cookbook_bin)


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

