"""The Tinker-shaped sampling client (``service.create_sampling_client(model_path=...)``
and its ``sample()``) through the unmodified SDK: every sampled token carries the
logprob of the distribution it was actually drawn from, at any temperature, top_p
and top_k the SDK sends.

The expected values are computed here from the snapshot's weights, one position
at a time with a plain filter written for the test (temperature, then the top_k
most likely tokens, then the top_p nucleus, renormalised), not with the server's
batched code.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch


def _snapshot_model(state_dir: Path, snapshot: str, base_model: str):
    from runner.local import catalogue
    from runner.local import model as model_io
    from runner.local.sampler import read_snapshot

    [path] = list(state_dir.rglob(f"snapshots/{snapshot}"))
    model = model_io.build_model(catalogue.resolve(base_model), seed=0)
    model_io.load_weight_dict(model, read_snapshot(str(path), base_model))
    return model


def _expected_sampling_logprobs(model, prompt: list[int], completion: list[int], temperature: float,
                                top_p: float, top_k: int) -> list[float]:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + completion])).logits[0].float()
    expected = []
    for i, token in enumerate(completion):
        if temperature == 0:
            expected.append(0.0)  # greedy: all the mass on the argmax
            continue
        probs = torch.softmax(logits[len(prompt) - 1 + i] / temperature, dim=-1).tolist()
        ranked = sorted(range(len(probs)), key=lambda t: -probs[t])
        kept = ranked[:top_k] if top_k > 0 else ranked
        mass = sum(probs[t] for t in kept)
        nucleus, before = [], 0.0
        for t in kept:
            if nucleus and before >= top_p:
                break
            nucleus.append(t)
            before += probs[t] / mass
        assert token in nucleus, (i, token, nucleus[:5])  # never drawn from outside the cut
        expected.append(math.log(probs[token] / sum(probs[t] for t in nucleus)))
    return expected


@pytest.fixture(scope="module")
def snapshot_client(service_info, sdk_helpers):
    """A trainer, a deployment and a sampler snapshot, for the module's tests."""
    service = sdk_helpers.make_service(service_info)
    training = service.create_training_client()
    saved = training.save_weights_for_sampler("sampling_logprobs.v1").result()
    yield service, saved.path
    service.close()


@pytest.mark.parametrize("temperature, top_p, top_k", [
    (0.7, 0.9, 20), (1.3, 1.0, 5), (1.0, 0.8, -1), (1.0, 1.0, -1)])
def test_sample_returns_the_logprobs_of_the_distribution_sampled_from(
        snapshot_client, service_info, sdk_helpers, tokenizer, temperature, top_p, top_k):
    from fireworks.training import tinker

    service, snapshot = snapshot_client
    sampling = service.create_sampling_client(model_path=snapshot, tokenizer=tokenizer)
    prompt = sdk_helpers.chat_prompt(tokenizer, "count to five")
    params = tinker.SamplingParams(max_tokens=10, temperature=temperature, top_p=top_p, top_k=top_k, seed=3)
    response = sampling.sample(tinker.ModelInput.from_ints(prompt), 3, params).result()

    model = _snapshot_model(sdk_helpers.state_dir(service_info), snapshot, service_info.base_model)
    assert len(response.sequences) == 3
    for sequence in response.sequences:
        assert len(sequence.tokens) == len(sequence.logprobs) >= 1
        expected = _expected_sampling_logprobs(model, prompt, list(sequence.tokens), temperature, top_p, top_k)
        assert sequence.logprobs == pytest.approx(expected, abs=2e-4)


def test_sampling_logprob_differs_from_the_model_logprob_when_the_distribution_is_cut(snapshot_client, http):
    """On the wire: ``logprob`` stays the model's (temperature 1, whole vocabulary),
    ``sampling_logprob`` is the cut distribution's, and is 0 where the cut keeps one token."""
    service, snapshot = snapshot_client
    service.create_sampling_client(model_path=snapshot)  # hot-loads the snapshot
    body = {"model": f"accounts/local/deployments/{service.deployment_id}", "prompt": [104, 105], "max_tokens": 8,
            "temperature": 0.5, "top_k": 1, "seed": 1, "logprobs": True, "raw_output": True}
    entries = http.post("/inference/v1/completions", json=body).json()["choices"][0]["logprobs"]["content"]
    assert entries and all(e["sampling_logprob"] == 0.0 and e["logprob"] < 0.0 for e in entries)
    wide = http.post("/inference/v1/completions", json={**body, "top_k": 0, "temperature": 2.0}).json()
    entries = wide["choices"][0]["logprobs"]["content"]
    assert all(e["sampling_logprob"] != e["logprob"] for e in entries)


def test_bad_sampling_parameters_are_400s_naming_the_field(snapshot_client, http):
    service, snapshot = snapshot_client
    model = f"accounts/local/deployments/{service.deployment_id}"
    for field, value in (("top_k", -2), ("top_k", 1.5), ("top_p", 0.0), ("temperature", -1)):
        resp = http.post("/inference/v1/completions", json={"model": model, "prompt": [104], "max_tokens": 2,
                                                            field: value})
        assert resp.status_code == 400, (field, value, resp.text)
        assert field in resp.text
    # ... and the deployment keeps serving.
    ok = http.post("/inference/v1/completions", json={"model": model, "prompt": [104], "max_tokens": 2})
    assert ok.status_code == 200
