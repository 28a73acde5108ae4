"""Scoring a prompt on a deployment, as the managed completions API does it: ``echo`` with
logprobs returns every prompt token's conditional logprob under the served weights
(equal within 1e-4 to the trainer's ``forward`` on the same tokens), the first token none;
``max_tokens`` 0 and 1 are scoring calls; the SDK's Tinker-shaped ``include_prompt_logprobs``
and ``compute_logprobs`` work on it; ``echo_last`` and ``top_logprobs`` too.

The deployment serves a snapshot taken after training steps, so its weights are not the
seeded init the trainer started from.
"""

from __future__ import annotations

import asyncio

import pytest
from fireworks.training import tinker

TOLERANCE = 1e-4


@pytest.fixture(scope="module", params=["qwen3-8b", "qwen3p6-35b-a3b"])
def trained(request, service_info, sdk_helpers):
    """(service, training client, sampling client, deployment model name, prompt) after two
    steps, with the deployment serving the trained snapshot."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(service_info.tokenizer_path)
    family = request.param  # the seed's model, and the hybrid-attention MoE of the cookbook
    service = sdk_helpers.make_service(
        service_info, base_model=f"accounts/fireworks/models/{family}",
        training_shape_id=f"accounts/fireworks/trainingShapes/{family}-128k")
    training = service.create_training_client()
    prompt = sdk_helpers.chat_prompt(tokenizer, "score me, please")
    data = [sdk_helpers.sft_datum(prompt, list(b"ok") + [tokenizer.convert_tokens_to_ids("<|im_end|>")])]
    for _ in range(2):
        training.forward_backward(data, "cross_entropy").result()
        training.optim_step(tinker.AdamParams(learning_rate=1e-2)).result()
    saved = training.save_weights_for_sampler("scored").result()
    sampling = training.create_sampling_client(saved.path)  # hot-loads the deployment
    yield service, training, sampling, f"accounts/local/deployments/{service.deployment_id}", prompt
    service.close()


def _forward_logprobs(training, tokens: list[int]) -> list[float]:
    """What the trainer computes for tokens[1:] given what precedes each."""
    datum = tinker.Datum(model_input=tinker.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs={
        "target_tokens": tinker.TensorData(data=tokens[1:], dtype="int64", shape=[len(tokens) - 1])})
    return list(training.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].data)


@pytest.mark.parametrize("max_tokens", [0, 1])
def test_echo_scores_the_prompt_as_the_trainer_does(trained, http, max_tokens):
    _, training, _, model, prompt = trained
    expected = _forward_logprobs(training, prompt)
    resp = http.post("/inference/v1/completions", json={
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "echo": True, "logprobs": True,
        "temperature": 0.0})
    assert resp.status_code == 200, resp.text
    [choice] = resp.json()["choices"]
    ids = choice["raw_output"]["completion_token_ids"]
    assert ids[:len(prompt)] == prompt and len(ids) == len(prompt) + max_tokens
    content = choice["logprobs"]["content"]
    assert [entry["token_id"] for entry in content] == ids
    scored = [entry["logprob"] for entry in content[1:len(prompt)]]
    assert max(abs(a - b) for a, b in zip(scored, expected, strict=True)) < TOLERANCE
    # Prompt tokens were not sampled: no behaviour-policy logprob for them.
    assert all(entry["sampling_logprob"] is None for entry in content[:len(prompt)])
    if max_tokens:
        generated = content[-1]
        assert generated["sampling_logprob"] == 0.0  # greedy
        full = prompt + [generated["token_id"]]
        assert abs(generated["logprob"] - _forward_logprobs(training, full)[-1]) < TOLERANCE


def test_include_prompt_logprobs_and_compute_logprobs_through_the_sdk(trained):
    _, training, sampling, _, prompt = trained
    expected = _forward_logprobs(training, prompt)
    response = sampling.sample(tinker.ModelInput.from_ints(prompt), 1, tinker.SamplingParams(max_tokens=3),
                               include_prompt_logprobs=True).result()
    assert response.prompt_logprobs[0] is None  # the first token has nothing to be conditioned on
    assert max(abs(a - b) for a, b in zip(response.prompt_logprobs[1:], expected, strict=True)) < TOLERANCE
    assert len(response.sequences[0].tokens) == len(response.sequences[0].logprobs) >= 1
    with pytest.warns(UserWarning, match="training_client.forward"):  # the SDK's own advice
        computed = sampling.compute_logprobs(tinker.ModelInput.from_ints(prompt)).result()
    assert computed[0] is None
    assert max(abs(a - b) for a, b in zip(computed[1:], expected, strict=True)) < TOLERANCE


def test_echo_through_the_deployment_sampler_with_echo_last_and_top_logprobs(trained, http, sdk_helpers):
    service, training, _, model, prompt = trained
    expected = _forward_logprobs(training, prompt)
    sampler = service.create_deployment_sampler(tokenizer=None)
    [completion] = asyncio.run(sampler.sample_with_prompt_tokens(prompt, n=1, max_tokens=2, temperature=0.0,
                                                                 logprobs=True, echo=True))
    assert completion.logprobs_echoed and completion.full_tokens[:len(prompt)] == prompt
    assert max(abs(a - b) for a, b in zip(completion.inference_logprobs[:len(prompt) - 1], expected)) < TOLERANCE

    # The last 3 prompt tokens only, each with its 4 most likely alternatives.
    resp = http.post("/inference/v1/completions", json={
        "model": model, "prompt": prompt, "max_tokens": 0, "echo_last": 3, "logprobs": True, "top_logprobs": 4})
    content = resp.json()["choices"][0]["logprobs"]["content"]
    assert [entry["token_id"] for entry in content] == prompt[-3:]
    assert max(abs(e["logprob"] - x) for e, x in zip(content, expected[-3:])) < TOLERANCE
    for entry in content:
        top = entry["top_logprobs"]
        assert len(top) == 4 and [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
        assert top[0]["logprob"] >= entry["logprob"] - TOLERANCE
        if entry["token_id"] in [t["token_id"] for t in top]:
            assert any(abs(t["logprob"] - entry["logprob"]) < TOLERANCE for t in top)


def test_a_text_prompt_is_scored_as_its_tokens(trained, http, tokenizer):
    _, training, _, model, _ = trained
    text = "<|im_start|>user\nhello<|im_end|>\n"
    tokens = list(tokenizer.encode(text, add_special_tokens=False))
    resp = http.post("/inference/v1/completions", json={
        "model": model, "prompt": text, "max_tokens": 0, "echo": True, "logprobs": True})
    choice = resp.json()["choices"][0]
    assert choice["raw_output"]["completion_token_ids"] == tokens and choice["text"] == text
    scored = [entry["logprob"] for entry in choice["logprobs"]["content"][1:]]
    assert max(abs(a - b) for a, b in zip(scored, _forward_logprobs(training, tokens), strict=True)) < TOLERANCE
