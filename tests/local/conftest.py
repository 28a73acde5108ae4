"""Fixtures for driving the real fireworks SDK against a real local service process.

One service (a subprocess on a temporary state dir) is shared by the whole session;
tests that need their own (restart, CLI) start one themselves. Each test uses
its own trainer job and deployment id, so tests do not see each other's state.
"""

from __future__ import annotations

import itertools
import logging
import uuid
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from runner.local.supervisor import LocalServiceInfo

logging.getLogger("fireworks").setLevel(logging.WARNING)

_deployment_counter = itertools.count(1)


@pytest.fixture(scope="session")
def service_info(local_info: LocalServiceInfo) -> LocalServiceInfo:
    """The session's one local service (tests/conftest.py)."""
    return local_info


@pytest.fixture(scope="session")
def tokenizer(service_info: LocalServiceInfo):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(service_info.tokenizer_path)


@pytest.fixture
def http(service_info: LocalServiceInfo) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=service_info.base_url, timeout=60) as client:
        yield client


def unique_deployment_id(prefix: str = "dep") -> str:
    return f"{prefix}-{next(_deployment_counter)}-{uuid.uuid4().hex[:6]}"


def make_service(info: LocalServiceInfo, **overrides: Any):
    """FiretitanServiceClient.from_firetitan_config as the seed calls it, with overrides."""
    from fireworks.training.sdk import FiretitanServiceClient

    config: dict[str, Any] = dict(
        api_key="local", base_url=info.base_url, base_model=info.base_model, tokenizer_model=info.tokenizer_path,
        lora_rank=0, training_shape_id=info.training_shape_id, deployment_id=unique_deployment_id(),
        learning_rate=1e-3, replica_count=1, cleanup_trainer_on_close=True,
        cleanup_deployment_on_close="delete")
    config.update(overrides)
    return FiretitanServiceClient.from_firetitan_config(**config)


@pytest.fixture
def provision(service_info: LocalServiceInfo):
    """Factory for SDK service clients on the shared service; all closed after the test."""
    created = []

    def factory(**overrides: Any):
        service = make_service(service_info, **overrides)
        created.append(service)
        return service

    yield factory
    for service in created:
        try:
            service.close()
        except Exception:
            pass


# -- data helpers ------------------------------------------------------------------------

def sft_datum(prompt: list[int], completion: list[int]):
    """Next-token datum, loss on the completion only (Tinker's layout)."""
    from fireworks.training import tinker

    full = prompt + completion
    weights = [0.0] * (len(prompt) - 1) + [1.0] * len(completion)
    return tinker.Datum(
        model_input=tinker.ModelInput.from_ints(full[:-1]),
        loss_fn_inputs={"target_tokens": tinker.TensorData(data=full[1:], dtype="int64", shape=[len(full) - 1]),
                        "weights": tinker.TensorData(data=weights, dtype="float32", shape=[len(weights)])})


def chat_prompt(tokenizer, text: str) -> list[int]:
    return list(tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=True,
                                              add_generation_prompt=True, return_dict=False))


def digest_trainer(http_client: httpx.Client, job_id: str) -> str:
    resp = http_client.get(f"/training/v1/rlorTrainerJobs/local/{job_id}/api/v1/local/weights_digest")
    resp.raise_for_status()
    return resp.json()["sha256"]


def digest_deployment(http_client: httpx.Client, deployment_id: str) -> str:
    resp = http_client.get(f"/local/v1/deployments/{deployment_id}/weights_digest")
    resp.raise_for_status()
    return resp.json()["sha256"]


def state_dir(info: LocalServiceInfo) -> Path:
    return Path(info.state_dir)


@pytest.fixture(scope="session")
def sdk_helpers():
    """The helpers above, for test modules (tests/local is not a package, so no imports)."""
    from types import SimpleNamespace
    return SimpleNamespace(make_service=make_service, sft_datum=sft_datum, chat_prompt=chat_prompt,
                           unique_deployment_id=unique_deployment_id, digest_trainer=digest_trainer,
                           digest_deployment=digest_deployment, state_dir=state_dir)
