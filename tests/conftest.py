"""Fixtures any test may use: a fresh SQLite ledger, and (session-wide, started on first
use) one real local service and one real ``mlflow server`` over HTTP."""

from __future__ import annotations

import os

# `make test` runs two workers, one per core. Each test process (and every service or program it
# starts) keeps one OpenMP thread: two 2-thread pools on two busy cores spin-wait on each other
# (benchmarks/local_service.py measured a raw train step at 1.19 s on two threads against
# 0.165 s on one, at load 3). Set before anything imports torch.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

from firetitan_track import Ledger
from firetitan_track.projections.mlflow import wait_for_http
from tests.helpers import POSTGRES_URL


@pytest.fixture
def ledger_url(tmp_path: Path) -> str:
    """A URL for a ledger that does not exist yet (created on first open)."""
    return f"sqlite:///{tmp_path / 'ledger.db'}"


@pytest.fixture
def postgres_admin() -> Iterator[Any]:
    import sqlalchemy as sa

    engine = sa.create_engine(POSTGRES_URL)
    yield engine
    engine.dispose()


@pytest.fixture
def empty_schema_url(postgres_admin: Any) -> Iterator[str]:
    """A PostgreSQL URL whose search_path is a new, empty schema, dropped afterwards."""
    schema = f"ft_test_{uuid.uuid4().hex[:12]}"
    with postgres_admin.begin() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    sep = "&" if "?" in POSTGRES_URL else "?"
    yield f"{POSTGRES_URL}{sep}options=-csearch_path%3D{schema}"
    with postgres_admin.begin() as conn:
        conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture
def ledger(ledger_url: str) -> Iterator[Ledger]:
    led = Ledger.open(ledger_url)
    yield led
    led.close()


@pytest.fixture(scope="session")
def local_state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("local-service")


@pytest.fixture(scope="session")
def local_info(local_state_dir: Path):  # type: ignore[no-untyped-def]
    """A real local service (its own process) for the whole session."""
    from runner.local.supervisor import local_service

    with local_service(state_dir=local_state_dir) as info:
        yield info


@pytest.fixture(scope="session")
def local_url(local_info) -> str:  # type: ignore[no-untyped-def]
    return local_info.base_url


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The tracking URI of an ``mlflow server`` with a sqlite store in a temporary folder."""
    root = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts"), "--serve-artifacts",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, cwd=root,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})  # no huey consumers polling
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/health", timeout=120)
    except TimeoutError:
        proc.kill()
        raise RuntimeError((root / "server.log").read_text()[-3000:]) from None
    yield url
    proc.terminate()
    proc.wait(30)
    log.close()


@pytest.fixture(scope="session")
def cookbook_bin() -> Path:
    """The ``bin`` folder of the cookbook's client environment (tests/envs.py), built on first use."""
    from tests.envs import cookbook_env

    return cookbook_env()


@pytest.fixture(scope="session")
def cookbook_core_bin(cookbook_bin: Path) -> Path:
    """The ``bin`` folder of the cookbook's client environment (fireworks-ai 1.2.24, tinker 0.23)
    plus the core of firetitan-track from a wheel of this checkout, as a researcher installs
    it there (tests/envs.py install_project: a derived environment; the cookbook's own is
    left as it is)."""
    from tests.envs import install_project

    return install_project(cookbook_bin, ())
