"""Other Python environments, built as their users build them, for tests that must run
code somewhere other than the project's own virtualenv: the cookbook's client
environment (fireworks-ai 1.2.24 with tinker 0.23), a fresh environment holding only
what a wheel of this project installs.

An environment is a virtualenv built once from a pinned requirements file and kept in
the user's cache (``~/.cache/firetitan-track/test-envs``, or under ``$XDG_CACHE_HOME``;
``FIRETITAN_TEST_ENVS`` moves it), keyed by the digest of that file: a changed pin builds a
new one, an unchanged one is reused by every later test run of every checkout of the
project (a fresh clone, a worktree), as pip reuses its cache. The first run on a machine
builds them (minutes: torch and the cookbook's client stack). torch, where asked for, is installed first at the CPU build this
machine holds (a looser request would download a CUDA build).

firetitan-track itself goes into such an environment as a user installs it: from a
wheel of this checkout (``project_wheel``, built once per process), with the extras
asked for, by ``install_project``. That never changes the environment it starts from
(other tests share it): it builds a derived one on top.
"""

from __future__ import annotations

import atexit
import fcntl
import functools
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Sequence

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
    if os.environ.get("FIRETITAN_TEST_ENVS"):
        return Path(os.environ["FIRETITAN_TEST_ENVS"])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "firetitan-track" / "test-envs"


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


# What a wheel is built from: the packaging file and the packages (tests and tools stay out).
WHEEL_SOURCES = ("pyproject.toml", "README.md", "firetitan_track", "runner")
LOCK = ROOT / "requirements.lock"
DERIVED_KEEP_S = 3 * 3600  # a derived env unused this long (an older wheel's) is removed


@functools.cache
def project_wheel() -> Path:
    """A wheel of this checkout, built once per process from a copy of its sources (a build
    in the checkout would leave build/ behind, and stale files there could reach the next
    wheel)."""
    out = Path(tempfile.mkdtemp(prefix="firetitan-wheel-"))
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    src = out / "src"
    for name in WHEEL_SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            src.mkdir(exist_ok=True)
            shutil.copy2(path, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check", "--no-deps",
                    "--no-build-isolation", "-w", str(out), str(src)], check=True, capture_output=True)
    (wheel,) = out.glob("firetitan_track-*.whl")
    return wheel


def wheel_digest(wheel: Path) -> str:
    """The digest of what a wheel holds (its RECORD lists every file's sha256), the same for
    two builds of the same sources though the zip files differ in their timestamps."""
    with zipfile.ZipFile(wheel) as z:
        record = next(n for n in z.namelist() if n.endswith(".dist-info/RECORD"))
        lines = sorted(z.read(record).decode().splitlines())
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:12]


def site_packages(bin: Path) -> Path:
    (found,) = (bin.parent / "lib").glob("python3*/site-packages")
    return found


def installed(bin: Path) -> dict[str, str]:
    """{normalized distribution name: version} of what an environment's own site-packages holds."""
    found = {}
    for info in site_packages(bin).glob("*.dist-info"):
        name, _, version = info.name[: -len(".dist-info")].partition("-")
        found[_normalize(name)] = version
    return found


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def install_project(bin: Path | None, extras: Sequence[str] = ()) -> Path:
    """The ``bin`` folder of an environment holding everything ``bin``'s environment holds,
    plus firetitan-track from this checkout's wheel with ``extras``, installed as a user
    installs it (``pip install 'firetitan-track[extras]'``: no -e, no source tree on the
    path). ``bin=None``: a fresh environment holding nothing else.

    ``bin``'s environment is never changed (other tests share it): the new one is a
    virtualenv layered on it, whose own site-packages come first and the base's after
    (a .pth file), so whatever pip adds, or installs in place of one of the base's
    packages, lands in the new one, where a test can see it (``installed``). What pip said
    is kept in its ``install.log``. Versions the base does not hold are taken from
    requirements.lock, so the same sources give the same environment. Built once per
    (base, extras, wheel contents) under a lock, and reused.
    """
    wheel = project_wheel()
    base = bin.parent if bin is not None else None
    tag = "+".join(sorted(extras)) or "core"
    name = f"{base.name if base else 'fresh'}+ft-{tag}"
    root = envs_root()
    root.mkdir(parents=True, exist_ok=True)
    home = root / f"{name}-{wheel_digest(wheel)}"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (home / ".ready").exists():
            os.utime(home / ".ready")  # in use: kept from pruning
            return home / "bin"
        shutil.rmtree(home, ignore_errors=True)
        python = str(home / "bin" / "python")
        held: dict[str, str] = {}
        if base is None:
            subprocess.run([base_python(), "-m", "venv", str(home)], check=True)
        else:
            # no pip of its own: the base's, found through the layer, installs into this prefix
            subprocess.run([base_python(), "-m", "venv", "--without-pip", str(home)], check=True)
            held = installed(bin)
            (site_packages(home / "bin") / "_firetitan_base_env.pth").write_text(
                f"import site; site.addsitedir({str(site_packages(bin))!r})\n")
        constraints = home / "constraints.txt"
        constraints.write_text("".join(line + "\n" for line in LOCK.read_text().splitlines()
                                       if "==" in line and _normalize(line.split("==")[0]) not in held))
        target = f"firetitan-track[{','.join(extras)}] @ {wheel.as_uri()}" if extras else str(wheel)
        log = subprocess.run([python, "-m", "pip", "install", "--disable-pip-version-check", "-c", str(constraints),
                              target], capture_output=True, text=True)
        (home / "install.log").write_text(log.stdout + log.stderr)
        if log.returncode != 0:
            raise RuntimeError(f"pip install {target} into {home} failed:\n{(log.stdout + log.stderr)[-3000:]}")
        (home / ".ready").write_text(f"{target}\n")
        _prune(root, name, keep=home)
    return home / "bin"


def _prune(root: Path, name: str, keep: Path) -> None:
    """Remove derived envs of ``name`` built from older wheels and unused for DERIVED_KEEP_S."""
    for old in root.glob(f"{name}-*"):
        ready = old / ".ready"
        if old != keep and (not ready.exists() or time.time() - ready.stat().st_mtime > DERIVED_KEEP_S):
            shutil.rmtree(old, ignore_errors=True)
