"""A real ``mlflow server`` over HTTP, shared by the exporter tests."""

from __future__ import annotations

import socket
import subprocess
import sys
import uuid
from typing import Iterator

import pytest

from firetitan_track.projections.mlflow import wait_for_http


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
        stdout=log, stderr=subprocess.STDOUT, cwd=root)
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


@pytest.fixture
def experiment() -> str:
    """A fresh experiment name, so tests sharing the server never see each other's runs."""
    return f"test-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def client(mlflow_server: str):  # type: ignore[no-untyped-def]
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=mlflow_server)

