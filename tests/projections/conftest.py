"""Per-test MLflow helpers; the ``mlflow_server`` itself is in tests/conftest.py."""

from __future__ import annotations

import uuid

import pytest


@pytest.fixture
def experiment() -> str:
    """A fresh experiment name, so tests sharing the server never see each other's runs."""
    return f"test-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def client(mlflow_server: str):  # type: ignore[no-untyped-def]
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=mlflow_server)

