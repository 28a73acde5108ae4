"""The local service under bad requests, and what it tells a user about them.

- One bad request costs one 4xx: wrong types are checked before use (``{"model": 5}`` is a
  400, not a 500), and the client's kept-alive connection serves the next request.
- A body over the size limit is refused by its declared length, before it is read; a text
  prompt longer than the context can hold is refused before it is tokenized.
- ``service.log`` names every refused request (method, path, status, message), and with
  ``local up --log-requests`` every request with its timing; no credential reaches it.
- ``local up --token`` makes every request but the health check present the token.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest

SECRET = "sk-test-0123456789abcdef"  # what a user's real key looks like, sent where keys go


def _connection(base_url: str) -> http.client.HTTPConnection:
    url = urlparse(base_url)
    return http.client.HTTPConnection(url.hostname, url.port, timeout=60)


def _post(conn: http.client.HTTPConnection, path: str, body: object, headers: dict | None = None):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request("POST", path, body=raw, headers={"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    return resp, resp.read()


@pytest.fixture(scope="module")
def deployment(service_info):
    """A deployment of the default model on the shared service (no trainer needed)."""
    import httpx

    deployment_id = f"requests-{os.getpid()}"
    with httpx.Client(base_url=service_info.base_url, timeout=60) as client:
        assert client.post(f"/v1/accounts/local/deployments?deploymentId={deployment_id}",
                           json={"baseModel": service_info.base_model}).status_code == 200
        yield f"accounts/local/deployments/{deployment_id}"
        client.delete(f"/v1/accounts/local/deployments/{deployment_id}")


def test_wrong_types_are_400s_and_the_connection_serves_on(service_info, deployment):
    conn = _connection(service_info.base_url)
    conn.connect()
    sock = conn.sock
    good = {"model": deployment, "prompt": [1, 2, 3], "max_tokens": 1, "temperature": 0}
    bad = [
        ({"model": 5, "prompt": [1, 2]}, "model"),
        ({**good, "prompt": {"text": "hi"}}, "prompt"),
        ({**good, "prompt": [1, "2"]}, "token ids must be integers"),
        ({**good, "max_tokens": "10"}, "max_tokens"),
        ({**good, "n": 2.5}, "n must be"),
        ({**good, "stream": "yes"}, "stream"),
        ({**good, "echo": "true"}, "echo"),
        ({**good, "echo_last": -1}, "echo_last"),
        ({**good, "logprobs": "all"}, "logprobs"),
        ({**good, "top_logprobs": 1000}, "top_logprobs"),
        ({**good, "temperature": "hot"}, "temperature"),
        ({**good, "top_k": 1.5}, "top_k"),
        ({**good, "seed": "42"}, "seed"),
        ({**good, "stop": 7}, "stop"),
        ([1, 2, 3], "JSON object"),
    ]
    for body, named in bad:
        resp, raw = _post(conn, "/inference/v1/completions", body)
        assert resp.status == 400, (body, raw)
        assert named in json.loads(raw)["error"]["message"], (body, raw)
        assert resp.getheader("connection") != "close" and conn.sock is sock  # the same connection, open
    resp, raw = _post(conn, "/inference/v1/completions", good)
    assert resp.status == 200, raw
    assert conn.sock is sock
    # The control plane checks its fields the same way.
    for path, body in (("/v1/accounts/local/deployments?deploymentId=typed", {"baseModel": 5}),
                       ("/v1/accounts/local/deployments?deploymentId=typed",
                        {"baseModel": service_info.base_model, "enableHotLoad": "yes"}),
                       ("/v1/accounts/local/rlorTrainerJobs?rlorTrainerJobId=typed", {"trainingConfig": "x"}),
                       ("/hot_load/v1/models/hot_load", {"identity": ["x"]})):
        resp, raw = _post(conn, path, body, {"fireworks-deployment": deployment})
        assert 400 <= resp.status < 500, (path, raw)
        assert conn.sock is sock
    conn.close()


def test_an_oversized_body_is_refused_before_it_is_read(service_info):
    url = urlparse(service_info.base_url)
    declared = 100 * 2**20
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        # Only the headers and a first kilobyte are sent: the answer must not wait for the rest.
        sock.sendall(b"POST /inference/v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {declared}\r\n\r\n".encode() + b'{"prompt": "' + b"a" * 1024)
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.partition(b"\r\n\r\n")[2]) < _content_length(answer):
            chunk = sock.recv(65536)
            assert chunk, f"the connection closed mid-answer: {answer!r}"
            answer += chunk
        answer = answer.decode()
    assert answer.startswith("HTTP/1.1 413"), answer[:200]
    assert "exceeds the local service's limit of 64 MiB" in answer
    conn = _connection(service_info.base_url)
    conn.request("GET", "/local/v1/healthz")
    assert conn.getresponse().status == 200
    conn.close()


def _content_length(response_head: bytes) -> int:
    for line in response_head.partition(b"\r\n\r\n")[0].split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def test_a_text_prompt_too_long_for_the_context_is_refused_before_tokenizing(service_info, deployment):
    conn = _connection(service_info.base_url)
    started = time.monotonic()
    resp, raw = _post(conn, "/inference/v1/completions", {"model": deployment, "prompt": "x" * (8 * 2**20)})
    assert resp.status == 400
    assert "refused before tokenizing" in json.loads(raw)["error"]["message"]
    resp, raw = _post(conn, "/inference/v1/completions", {"model": deployment, "prompt": list(range(200)) * 100})
    assert resp.status == 400 and "context length is 512 tokens" in json.loads(raw)["error"]["message"]
    conn.request("GET", "/local/v1/healthz")
    assert conn.getresponse().status == 200
    assert time.monotonic() - started < 30  # an upper bound for a loaded machine, not a timing claim
    conn.close()


def test_refused_requests_are_logged_without_credentials(service_info, deployment):
    log = Path(service_info.state_dir) / "service.log"
    conn = _connection(service_info.base_url)
    # A user who pasted their key into the wrong field, and sent it where keys go.
    resp, _ = _post(conn, "/inference/v1/completions", {"model": f"accounts/local/deployments/{SECRET}",
                                                        "prompt": [1]},
                    {"Authorization": f"Bearer {SECRET}"})
    assert resp.status == 404
    resp, _ = _post(conn, "/inference/v1/completions?api_key=" + SECRET, {"model": deployment, "prompt": 3},
                    {"X-API-Key": SECRET})
    assert resp.status == 400
    conn.close()
    text = _wait_for(log, "prompt must be a list of token ids or a string")
    assert f"refused POST /inference/v1/completions -> 404" in text
    assert "refused POST /inference/v1/completions -> 400" in text
    assert "deployment '***' not found" in text
    assert SECRET not in text


def _wait_for(log: Path, needle: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = log.read_text(errors="replace")
        if needle in text or time.monotonic() > deadline:
            return text
        time.sleep(0.05)


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """`local up --log-requests --token` (the token from the environment, as the help advises)."""
    state_dir = tmp_path_factory.mktemp("guarded")
    cli = str(Path(sys.executable).with_name("firetitan-track"))
    env = {**os.environ, "FIRETITAN_LOCAL_TOKEN": SECRET}
    up = subprocess.run([cli, "local", "up", "--state-dir", str(state_dir), "--log-requests"], env=env,
                        capture_output=True, text=True, timeout=120)
    assert up.returncode == 0, up.stderr
    yield json.loads(up.stdout.strip().splitlines()[-1]), state_dir
    subprocess.run([cli, "local", "down", "--state-dir", str(state_dir)], capture_output=True, timeout=60)


def test_the_token_is_required_and_every_request_is_logged_with_its_time(guarded):
    from fireworks.training.sdk import FireworksClient

    info, state_dir = guarded
    conn = _connection(info["base_url"])
    for headers, status in (({}, 401), ({"Authorization": "Bearer wrong-token-123"}, 401),
                            ({"Authorization": f"Bearer {SECRET}"}, 200), ({"X-API-Key": SECRET}, 200)):
        conn.request("GET", "/v1/accounts", headers=headers)
        resp = conn.getresponse()
        resp.read()
        assert resp.status == status, headers
    conn.request("GET", "/local/v1/healthz")  # how `local up` and the runner see it is alive
    health = conn.getresponse()
    assert health.status == 200 and health.read()
    conn.close()
    # The unmodified SDK passes with the token as its API key, and is refused without it.
    with FireworksClient(api_key=SECRET, base_url=info["base_url"]) as client:
        profile = client.resolve_training_profile("accounts/fireworks/trainingShapes/qwen3-8b-128k-h200")
        assert profile.trainer_mode == "POLICY_TRAINER"
    with FireworksClient(api_key="local", base_url=info["base_url"]) as client, \
            pytest.raises(RuntimeError, match="HTTP 401"):
        client.resolve_training_profile("accounts/fireworks/trainingShapes/qwen3-8b-128k-h200")

    text = _wait_for(state_dir / "service.log", "GET /v1/accounts/fireworks/trainingShapes/qwen3-8b-128k-h200/versions -> 401")
    assert "refused GET /v1/accounts -> 401" in text
    assert "GET /v1/accounts -> 200 in " in text and " ms" in text
    assert "GET /v1/accounts/fireworks/trainingShapes/qwen3-8b-128k-h200/versions -> 200 in" in text
    # The token is nowhere a user or another process could read it.
    assert SECRET not in text
    assert SECRET not in (state_dir / "service.json").read_text()
    assert SECRET.encode() not in Path(f"/proc/{info['pid']}/cmdline").read_bytes()
