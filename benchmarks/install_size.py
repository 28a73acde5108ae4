"""What installing firetitan-track costs: the core alone against everything.

Prints one JSON object:

- ``core_packages`` / ``all_packages``: the distributions ``pip install firetitan-track``
  (resp. ``'firetitan-track[all]'``, torch 2.13.0 installed first as `make install` does)
  adds to a fresh virtualenv, firetitan-track included (pip and setuptools, which every
  virtualenv starts with, are not counted); ``core_mb`` / ``all_mb``: the bytes of their
  files; ``core_vs_all_size_ratio`` and ``core_vs_all_packages_ratio``.
- ``core_install_s``: the wall time of ``pip install <wheel>`` into a fresh virtualenv
  from the local package cache (warmed by one untimed install first), the median of
  ``--rounds``; ``venv_create_s`` the median time to create that virtualenv (not
  included); ``all_install_s`` one timed install of ``[all]`` from the same cache (the
  developers' `make install` has warmed it); ``core_vs_all_install_time_ratio``.

The wheel is built from this checkout (tests/envs.py); versions come from requirements.lock,
as in the tests' environments. Usage: ``python benchmarks/install_size.py [--rounds N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.envs import LOCK, TORCH, base_python, project_wheel, site_packages  # noqa: E402

SEEDED = {"pip", "setuptools"}  # what `python -m venv` puts in every environment


def fresh_env(home: Path) -> tuple[Path, float]:
    started = time.perf_counter()
    subprocess.run([base_python(), "-m", "venv", str(home)], check=True)
    return home / "bin", time.perf_counter() - started


def pip_install(bin: Path, *args: str) -> float:
    started = time.perf_counter()
    subprocess.run([str(bin / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    "-c", str(LOCK), *args], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def footprint(bin: Path) -> tuple[int, float]:
    """(distributions, MB) the environment holds beyond what a new virtualenv starts with,
    each distribution's size the sum of the files its RECORD lists."""
    site = site_packages(bin)
    count, size = 0, 0
    for info in site.glob("*.dist-info"):
        if info.name.split("-")[0].lower() in SEEDED:
            continue
        count += 1
        for line in (info / "RECORD").read_text().splitlines():
            path = (site / line.split(",")[0]).resolve()
            if path.is_file():
                size += path.stat().st_size
    return count, size / 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    wheel = str(project_wheel())
    with tempfile.TemporaryDirectory(prefix="install-bench-") as tmp:
        root = Path(tmp)
        warm, _ = fresh_env(root / "warm")
        pip_install(warm, wheel)  # fills the cache with the core's files, untimed
        core_times, venv_times = [], []
        for r in range(args.rounds):
            bin, created = fresh_env(root / f"core-{r}")
            venv_times.append(created)
            core_times.append(pip_install(bin, wheel))
        core = footprint(bin)
        everything, _ = fresh_env(root / "all")
        all_time = pip_install(everything, TORCH) + pip_install(everything, f"firetitan-track[all] @ file://{wheel}")
        full = footprint(everything)
    core_s = statistics.median(core_times)
    print(json.dumps({
        "core_packages": core[0], "core_mb": round(core[1], 1),
        "all_packages": full[0], "all_mb": round(full[1], 1),
        "core_vs_all_packages_ratio": round(core[0] / full[0], 3),
        "core_vs_all_size_ratio": round(core[1] / full[1], 4),
        "core_install_s": round(core_s, 2), "core_install_s_rounds": [round(t, 2) for t in core_times],
        "venv_create_s": round(statistics.median(venv_times), 2),
        "all_install_s": round(all_time, 1),
        "core_vs_all_install_time_ratio": round(core_s / all_time, 3),
        "load_average": os.getloadavg(),
    }, indent=2))


if __name__ == "__main__":
    main()
