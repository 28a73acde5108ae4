"""Fixtures for driving the unmodified ``tinker`` client (0.38, the project's pin) against the
session's local service (tests/conftest.py ``local_info``), and tinker-cookbook in its own
environment."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from runner.local.state import HF_CACHE_DIR

TINY = "local/tiny-qwen3"          # a catalogue name: the tinker client takes any served name
TINKER_NAME = "Qwen/Qwen3-8B"      # Tinker's own name for the stand-in the cookbook recipes ask for
REQUIREMENTS = Path(__file__).resolve().parent / "requirements.txt"


@pytest.fixture(scope="session")
def service_client(local_info):  # type: ignore[no-untyped-def]
    import tinker

    client = tinker.ServiceClient(base_url=local_info.base_url, api_key="tml-local")
    yield client
    client.close("success").result()


@pytest.fixture
def http(local_info) -> Iterator[httpx.Client]:  # type: ignore[no-untyped-def]
    with httpx.Client(base_url=local_info.base_url, timeout=60) as client:
        yield client


@pytest.fixture(scope="session")
def tinker_env(local_info) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """What `firetitan-track local env` exports: an unmodified program's whole configuration."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "TINKER_"))}
    env.update(TINKER_BASE_URL=local_info.base_url, TINKER_API_KEY="tml-local", HF_HUB_OFFLINE="1",
               HF_HUB_CACHE=str(Path(local_info.state_dir) / HF_CACHE_DIR))
    return env


@pytest.fixture(scope="session")
def tinker_cookbook_bin() -> Path:
    """The ``bin`` folder of tinker-cookbook's environment (built once, tests/envs.py)."""
    from tests.envs import build_env

    return build_env("tinker-cookbook", REQUIREMENTS, torch=True)


@pytest.fixture(scope="session")
def tinker_cookbook_recorder_bin(tinker_cookbook_bin: Path) -> Path:
    """tinker-cookbook's environment with the core of firetitan-track installed from a wheel of
    this checkout, as a researcher installs it there (tests/envs.py install_project)."""
    from tests.envs import install_project

    return install_project(tinker_cookbook_bin, ())
