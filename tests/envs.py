"""Other Python environments, built as their users build them, for tests that must run
code somewhere other than the project's own virtualenv: the cookbook's client
environment (fireworks-ai 1.2.24 with tinker 0.23), a fresh environment holding only
what a wheel of this project installs.

An environment is a virtualenv built once from a pinned requirements file and kept
under ``.envs/`` in the checkout (``FIRETITAN_TEST_ENVS`` moves it), keyed by the
digest of that file: a changed pin builds a new one, an unchanged one is reused by
every later test run. torch, where asked for, is installed first at the CPU build this
machine holds (a looser request would download a CUDA build).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _cookbook() -> Path:
    """The fw-ai/cookbook ``training/`` tree, unmodified: ``$FIRETITAN_COOKBOOK``, else the
    ``shared/cookbook`` beside the checkout (or beside a folder above it: a worktree or a
    clone one level deeper), else the workplace's own copy."""
    if os.environ.get("FIRETITAN_COOKBOOK"):
        return Path(os.environ["FIRETITAN_COOKBOOK"])
    for parent in ROOT.parents:
        if (parent / "shared" / "cookbook" / "SHA256SUMS").exists():
            return parent / "shared" / "cookbook"
    return Path("/work/shared/cookbook")


COOKBOOK = _cookbook()
COOKBOOK_REQUIREMENTS = Path(__file__).resolve().parent / "cookbook" / "requirements.txt"
TORCH = "torch==2.13.0"


def envs_root() -> Path:
    return Path(os.environ.get("FIRETITAN_TEST_ENVS") or ROOT / ".envs")


def base_python() -> str:
    """The interpreter the project's own virtualenv was made from (a venv of a venv
    would share nothing, but the base one is what a user's environment starts from)."""
    return getattr(sys, "_base_executable", None) or sys.executable


def build_env(name: str, requirements: Path, *, torch: bool = False) -> Path:
    """The ``bin`` folder of a virtualenv holding ``requirements`` (and torch first when
    asked), built on first use and reused while the file is unchanged."""
    text = requirements.read_text()
    key = hashlib.sha256(f"{text}\n{torch}\n{sys.version}".encode()).hexdigest()[:12]
    root = envs_root()
    root.mkdir(parents=True, exist_ok=True)
    home = root / f"{name}-{key}"
    with open(root / f"{name}.lock", "w") as lock:  # two test runs building at once wait for one
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (home / ".ready").exists():
            shutil.rmtree(home, ignore_errors=True)
            subprocess.run([base_python(), "-m", "venv", str(home)], check=True)
            pip = [str(home / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
            if torch:
                subprocess.run([*pip, TORCH], check=True)
            subprocess.run([*pip, "-r", str(requirements)], check=True)
            (home / ".ready").write_text(text)
    return home / "bin"


def cookbook_env() -> Path:
    """The cookbook's client environment: its recipes import from ``COOKBOOK`` on PYTHONPATH."""
    return build_env("cookbook", COOKBOOK_REQUIREMENTS, torch=True)
