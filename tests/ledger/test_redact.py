"""Redaction: which names count as credentials, and that secret values are masked everywhere."""

from __future__ import annotations

import json

import pytest

from firetitan_track.blobs import canonical_json
from firetitan_track.redact import (
    MASK,
    is_secret_key,
    may_need_redaction,
    redact,
    redact_bytes,
    redact_text,
    secret_values,
)

KEY = "fw_live_0123456789abcdef"


@pytest.mark.parametrize("name", ["api_key", "apiKey", "FIREWORKS_API_KEY", "access_token", "secret",
                                  "password", "client_secret", "refreshToken", "Authorization",
                                  "private-key", "HF_TOKEN"])
def test_credential_names_are_secret(name: str) -> None:
    assert is_secret_key(name)


@pytest.mark.parametrize("name", ["max_tokens", "tokens", "token", "prompt_tokens", "key", "dict_key",
                                  "sort_key", "loss", "token_ids", "num_tokens", "keys"])
def test_ordinary_names_in_this_domain_are_not_secret(name: str) -> None:
    assert not is_secret_key(name)


def test_secret_named_fields_are_masked_at_any_depth() -> None:
    value = {"api_key": "x" * 10, "nested": [{"access_token": "abc", "max_tokens": 64}],
             "token": "Hello", "password": None}
    assert redact(value) == {"api_key": MASK, "nested": [{"access_token": MASK, "max_tokens": 64}],
                             "token": "Hello", "password": None}
    assert value["api_key"] == "x" * 10, "redact must not change its argument"


def test_the_api_key_value_is_masked_inside_any_string(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FIREWORKS_API_KEY", KEY)
    assert redact({"error": f"401 Unauthorized (key {KEY})"}) == {"error": f"401 Unauthorized (key {MASK})"}
    assert redact_text(f"curl -H 'x: {KEY}'") == f"curl -H 'x: {MASK}'"
    assert redact_bytes(f"line {KEY}\n".encode()) == f"line {MASK}\n".encode()


def test_other_credential_env_values_are_masked_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_API_KEY", "wandb-secret-value")
    monkeypatch.setenv("SHORT_TOKEN", "abc")  # too short to mask safely
    assert "wandb-secret-value" in secret_values()
    assert redact_text("wandb-secret-value and abc") == f"{MASK} and abc"


def test_bearer_tokens_are_masked_in_text() -> None:
    assert redact_text("Authorization: Bearer sk-abcdefghijkl") == f"Authorization: Bearer {MASK}"


@pytest.mark.parametrize("payload", [
    {"step": 1, "metrics": {"loss": 0.5}},
    {"api_key": "zzzzzzzz"},
    {"note": 'quoted "fw_live_0123456789abcdef" here'},
    {"x": [{"y": "fw_live_0123456789abcdef"}]},
    {"headers": {"Authorization": "Bearer abcdefghijk"}},
    {"sampling": {"max_tokens": 8}},
])
def test_the_fast_path_never_skips_something_redact_would_change(
        payload: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FIREWORKS_API_KEY", KEY)
    secrets = secret_values()
    text = canonical_json(payload)
    if canonical_json(redact(payload, secrets)) != text:
        assert may_need_redaction(text, secrets)


def test_a_secret_with_json_special_characters_is_still_found(monkeypatch: pytest.MonkeyPatch) -> None:
    odd = 'pa"ss\\word-1234'
    monkeypatch.setenv("FIREWORKS_API_KEY", odd)
    text = json.dumps({"note": f"uses {odd}"})
    assert may_need_redaction(text, secret_values())
    assert redact({"note": f"uses {odd}"}) == {"note": f"uses {MASK}"}


def test_the_working_directory_is_not_a_secret(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    # the shell exports PWD; a spec path under it was once recorded as "***/svc"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PWD", str(tmp_path))
    monkeypatch.setenv("OLDPWD", str(tmp_path.parent))
    assert not is_secret_key("PWD") and not is_secret_key("OLDPWD")
    spec = {"backend": {"state_dir": f"{tmp_path}/svc"}}
    assert redact(spec) == spec
    assert redact_text(f"{tmp_path}/specs/run.toml: bad key") == f"{tmp_path}/specs/run.toml: bad key"


def test_a_credential_named_variable_holding_a_path_is_not_masked(monkeypatch: pytest.MonkeyPatch,
                                                                  tmp_path) -> None:
    # it says where a secret lives; the file name itself is not the secret
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "creds.json"))
    monkeypatch.setenv("MY_SECRET_FILE_TOKEN_PATH_API_KEY", "relative/dir/that/exists")
    (tmp_path / "relative/dir/that/exists").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert all("creds.json" not in s and "relative/" not in s for s in secret_values())
    assert redact_text(f"read {tmp_path}/creds.json") == f"read {tmp_path}/creds.json"


@pytest.mark.parametrize("name", ["DB_PASSWORD", "HF_TOKEN", "OPENAI_API_KEY", "CLIENT_SECRET", "GITHUB_TOKEN"])
def test_values_of_key_token_password_and_secret_variables_are_masked(name: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(name, "s3cr3t-v4lue-xyz")
    assert redact_text("x s3cr3t-v4lue-xyz y") == f"x {MASK} y"


def test_count_masked_says_how_much_of_the_data_redaction_changed(monkeypatch: pytest.MonkeyPatch) -> None:
    from firetitan_track.redact import count_masked

    monkeypatch.setenv("FIREWORKS_API_KEY", KEY)
    data = [{"messages": [{"role": "user", "content": f"my key is {KEY}"}], "answer": "ok"},
            {"messages": [{"role": "user", "content": "reverse 1234"}], "answer": "4321"},
            {"prompt": "p", "answer": f"{KEY}!"}]
    assert count_masked(data) == 2
    assert count_masked(redact(data)) == 0
