"""The unmodified ``tinker`` client (0.38) against ``local up``: LoRA training, states loaded
into new clients, sampler weights that sample what the trainer computes, the loss functions
the client names, custom losses, the REST calls, and one engine under both protocols."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tinker
from tinker import types

from tests.tinker.conftest import TINKER_NAME, TINY

PROMPT = list(b"<|im_start|>user\nreverse 123<|im_end|>\n<|im_start|>assistant\n")


def datum(tokens: list[int], **inputs) -> types.Datum:
    """Next-token datum over ``tokens`` with extra per-target inputs (lists aligned with the targets)."""
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={"target_tokens": tokens[1:], **inputs})


def logprobs(client, data) -> list[np.ndarray]:
    out = client.forward(data, "cross_entropy").result()
    return [np.asarray(o["logprobs"].data, dtype=np.float64) for o in out.loss_fn_outputs]


def sft_batch() -> list[types.Datum]:
    answer = list(b"321") + [258]
    tokens = PROMPT + answer
    weights = [0.0] * (len(PROMPT) - 1) + [1.0] * len(answer)
    return [datum(tokens, weights=weights)]


def test_lora_client_trains_saves_resumes_and_samples_what_it_computes(service_client):
    """The issue's acceptance flow, by the Tinker names a recipe uses."""
    training = service_client.create_lora_training_client(base_model=TINKER_NAME, rank=8, seed=3).result()
    info = training.get_info()
    assert info.model_data.model_name == TINKER_NAME and info.is_lora and info.lora_rank == 8
    tokenizer = training.get_tokenizer()  # get_info names the served model's own tokenizer
    assert tokenizer.encode("321", add_special_tokens=False) == list(b"321")

    data = sft_batch()
    before = logprobs(training, data)[0]
    losses = []
    for _ in range(3):
        fb = training.forward_backward(data, "cross_entropy")
        step = training.optim_step(types.AdamParams(learning_rate=5e-3))
        losses.append(fb.result().metrics["loss:sum"])
        assert step.result().metrics["learning_rate"] == pytest.approx(5e-3)
    assert losses[-1] < losses[0]
    trained = logprobs(training, data)[0]
    assert not np.allclose(trained, before)

    saved = training.save_state("after-3").result()
    assert saved.path == f"tinker://{training.model_id}/weights/after-3"
    resumed = service_client.create_training_client_from_state_with_optimizer(saved.path).result()
    assert resumed.model_id != training.model_id and resumed.get_info().lora_rank == 8
    np.testing.assert_allclose(logprobs(resumed, data)[0], trained, atol=1e-6)
    # With the optimizer's moments restored, the next step is the one the original takes.
    for client in (training, resumed):
        client.forward_backward(data, "cross_entropy").result()
        client.optim_step(types.AdamParams(learning_rate=5e-3)).result()
    np.testing.assert_allclose(logprobs(resumed, data)[0], logprobs(training, data)[0], atol=1e-5)

    sampler_path = resumed.save_weights_for_sampler("after-4").result().path
    assert sampler_path == f"tinker://{resumed.model_id}/sampler_weights/after-4"
    sampling = service_client.create_sampling_client(model_path=sampler_path).result()
    assert sampling.get_base_model() == TINKER_NAME
    response = sampling.sample(types.ModelInput.from_ints(PROMPT), 2,
                               types.SamplingParams(max_tokens=8, temperature=1.0, seed=7)).result()
    assert len(response.sequences) == 2
    reference = logprobs(resumed, [datum(PROMPT + s.tokens) for s in response.sequences])
    for seq, forward in zip(response.sequences, reference):
        assert len(seq.tokens) == len(seq.logprobs) > 0 and seq.stop_reason in ("stop", "length")
        np.testing.assert_allclose(seq.logprobs, forward[len(PROMPT) - 1:], atol=1e-4)
    # compute_logprobs scores a prompt under the same weights: the trainer's forward again.
    scored = sampling.compute_logprobs(types.ModelInput.from_ints(PROMPT + response.sequences[0].tokens)).result()
    assert scored[0] is None
    np.testing.assert_allclose(scored[1:], reference[0], atol=1e-4)


def test_save_weights_and_get_sampling_client_serves_the_current_weights(service_client):
    training = service_client.create_lora_training_client(base_model=TINY, rank=4).result()
    data = sft_batch()
    training.forward_backward(data, "cross_entropy").result()
    training.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    sampling = training.save_weights_and_get_sampling_client().result()
    tokens = PROMPT + list(b"321")
    scored = sampling.compute_logprobs(types.ModelInput.from_ints(tokens)).result()
    np.testing.assert_allclose(scored[1:], logprobs(training, [datum(tokens)])[0], atol=1e-4)
    # top-k at each sampled position: the sampled token's own logprob is among them at temperature 1
    response = sampling.sample(types.ModelInput.from_ints(PROMPT), 1, types.SamplingParams(max_tokens=4, seed=1),
                               include_prompt_logprobs=True, topk_prompt_logprobs=3, topk_sample_logprobs=5).result()
    seq = response.sequences[0]
    assert len(seq.topk_logprobs) == len(seq.tokens)
    for token, logprob, top in zip(seq.tokens, seq.logprobs, seq.topk_logprobs):
        assert len(top) == 5 and top[0][1] >= top[-1][1]
        assert logprob <= top[0][1] + 1e-5
    assert response.topk_prompt_logprobs[0] is None and len(response.topk_prompt_logprobs[1]) == 3


@pytest.mark.parametrize("loss_fn", ["importance_sampling", "ppo", "cispo", "dro"])
def test_policy_losses_are_computed_on_the_inputs_the_client_sent(service_client, loss_fn):
    """Each loss the client names, on logprobs and advantages it sent as protobuf tensors:
    the service's loss:sum is the documented formula evaluated on the trainer's logprobs."""
    training = service_client.create_lora_training_client(base_model=TINY, rank=4).result()
    tokens = PROMPT + list(b"321")
    (current,) = logprobs(training, [datum(tokens)])
    rng = np.random.default_rng(0)
    sampled = (current + rng.normal(0, 0.3, current.shape)).astype(np.float32)
    advantages = rng.normal(0, 1, current.shape).astype(np.float32)
    config = {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1} if loss_fn in ("ppo", "cispo") else None
    if loss_fn == "dro":
        config = {"beta": 0.1}
    out = training.forward([datum(tokens, logprobs=sampled.tolist(), advantages=advantages.tolist())], loss_fn,
                           config).result()
    ratio = np.exp(current - sampled)
    expected = {
        "importance_sampling": -(ratio * advantages).sum(),
        "ppo": -np.minimum(ratio * advantages, np.clip(ratio, 0.9, 1.1) * advantages).sum(),
        "cispo": -(np.clip(ratio, 0.9, 1.1) * current * advantages).sum(),
        "dro": -(current * advantages - 0.05 * (current - sampled) ** 2).sum(),
    }[loss_fn]
    assert out.metrics["loss:sum"] == pytest.approx(expected, rel=1e-4, abs=1e-4)


def test_forward_backward_custom_trains_on_the_client_side_loss(service_client):
    training = service_client.create_lora_training_client(base_model=TINY, rank=4).result()
    data = sft_batch()
    before = logprobs(training, data)[0]

    def mean_nll(batch, logprob_list):
        import torch
        loss = sum(-(lp * torch.tensor(d.loss_fn_inputs["weights"].data)).sum() for d, lp in zip(batch, logprob_list))
        return loss, {"custom:sum": float(loss.detach())}

    result = training.forward_backward_custom(data, mean_nll).result()
    expected = -(before * np.asarray(data[0].loss_fn_inputs["weights"].data)).sum()
    assert result.metrics["loss:sum"] == pytest.approx(expected, rel=1e-5)
    training.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    assert logprobs(training, data)[0] @ np.asarray(data[0].loss_fn_inputs["weights"].data) > before @ np.asarray(
        data[0].loss_fn_inputs["weights"].data)


def test_rest_calls_list_runs_checkpoints_and_weights_info(service_client, local_info):
    training = service_client.create_lora_training_client(base_model=TINY, rank=4,
                                                          user_metadata={"recipe": "test"}).result()
    state = training.save_state("rest-state").result().path
    sampler = training.save_weights_for_sampler("rest-sampler").result().path
    rest = tinker.RestClient(base_url=local_info.base_url, api_key="tml-local")
    run = rest.get_training_run(training.model_id).result()
    assert run.base_model == TINY and run.is_lora and run.lora_rank == 4 and run.user_metadata == {"recipe": "test"}
    assert run.last_checkpoint.tinker_path == state and run.last_sampler_checkpoint.tinker_path == sampler
    assert rest.get_training_run_by_tinker_path(sampler).result().training_run_id == training.model_id
    listed = rest.list_checkpoints(training.model_id).result().checkpoints
    assert {(c.checkpoint_type, c.tinker_path) for c in listed} == {("training", state), ("sampler", sampler)}
    assert all(c.size_bytes > 0 for c in listed)
    info = rest.get_weights_info_by_tinker_path(state).result()
    assert info.base_model == TINY and info.is_lora and info.lora_rank == 4
    assert training.model_id in [r.training_run_id for r in rest.list_training_runs(limit=100).result().training_runs]
    assert state in [c.tinker_path for c in rest.list_user_checkpoints(limit=1000).result().checkpoints]
    rest.delete_checkpoint_from_tinker_path(state).result()
    assert [c.tinker_path for c in rest.list_checkpoints(training.model_id).result().checkpoints] == [sampler]
    with pytest.raises(Exception, match="no training state"):
        service_client.create_training_client_from_state(state).result()


def test_one_engine_a_firetitan_job_state_trains_on_under_the_tinker_client(service_client, local_info):
    """A full-parameter state saved through the FireTitan SDK is a tinker:// path: the Tinker
    client loads it (a full-parameter training run) and computes what the FireTitan trainer does."""
    from fireworks.training import tinker as fw_tinker

    from tests.local.conftest import make_service

    service = make_service(local_info, base_model=TINY, training_shape_id="accounts/fireworks/trainingShapes/ts-local-tiny")
    try:
        firetitan = service.create_training_client()
        fw_data = [fw_tinker.Datum(model_input=fw_tinker.ModelInput.from_ints(PROMPT[:-1]), loss_fn_inputs={
            "target_tokens": fw_tinker.TensorData(data=PROMPT[1:], dtype="int64", shape=[len(PROMPT) - 1])})]
        firetitan.forward_backward(fw_data, "cross_entropy").result()
        firetitan.optim_step(fw_tinker.AdamParams(learning_rate=1e-3)).result()
        expected = firetitan.forward(fw_data, "cross_entropy").result().loss_fn_outputs[0]["logprobs"].data
        firetitan.save_state("shared-state").result()
        path = f"tinker://{service.trainer_job_id}/weights/shared-state"
        training = service_client.create_training_client_from_state(path).result()
        assert not training.get_info().is_lora
        np.testing.assert_allclose(logprobs(training, [datum(PROMPT)])[0], expected, atol=1e-6)
        training.forward_backward([datum(PROMPT)], "cross_entropy").result()
        assert training.optim_step(types.AdamParams(learning_rate=1e-3)).result().metrics["grad_norm"] > 0
    finally:
        service.close()


def test_sampling_a_base_model_by_name(service_client):
    sampling = service_client.create_sampling_client(base_model=TINY).result()
    response = sampling.sample(types.ModelInput.from_ints(PROMPT), 1,
                               types.SamplingParams(max_tokens=3, temperature=0.0)).result()
    again = sampling.sample(types.ModelInput.from_ints(PROMPT), 1,
                            types.SamplingParams(max_tokens=3, temperature=0.0)).result()
    assert response.sequences[0].tokens == again.sequences[0].tokens and len(response.sequences[0].tokens) == 3
    assert all(math.isfinite(x) for x in response.sequences[0].logprobs)
