"""LoRA through the unmodified SDK: adapters train (the base stays frozen and the
optimizer holds adapters only), the seed's shared-session reference, adapter snapshots
that the deployment serves exactly as the trainer computes them, DCP states that
round-trip adapters and optimizer across jobs, weights_info, promotion, bad input."""

from __future__ import annotations

import asyncio
import math

import pytest
from fireworks.training import tinker
from fireworks.training.sdk._core.lib.public_interfaces.rest_client import RestClient
from fireworks.training.sdk.sampling import DeploymentSampler

TINY = "local/tiny-qwen3"
LORA_SHAPE = "accounts/fireworks/trainingShapes/ts-local-tiny-lora"
RANK = 4


@pytest.fixture(scope="module")
def batch(tokenizer, sdk_helpers):
    prompt = sdk_helpers.chat_prompt(tokenizer, "ping")
    return prompt, [sdk_helpers.sft_datum(prompt, list(b"pong") + [tokenizer.convert_tokens_to_ids("<|im_end|>")])]


def lora_service(provision, **overrides):
    config = dict(base_model=TINY, lora_rank=RANK, training_shape_id=LORA_SHAPE)
    config.update(overrides)
    return provision(**config)


def logprobs(client, data) -> list[float]:
    return client.forward(data, "cross_entropy").result().loss_fn_outputs[0]["logprobs"].data


def test_lora_trains_adapters_and_the_deployment_serves_what_the_trainer_computes(
        provision, batch, http, sdk_helpers, service_info, tokenizer):
    prompt, data = batch
    jobs_before = len(http.get("/v1/accounts/local/rlorTrainerJobs").json()["rlorTrainerJobs"])
    service = lora_service(provision)
    training = service.create_training_client(lora_rank=RANK)  # the rank the service was made with
    reference = service.create_reference_client()

    # The seed's reference for a LoRA policy: the same trainer with adapters disabled.
    assert service.reference_job_id is None and service.reference_client_job_id == service.trainer_job_id
    assert len(http.get("/v1/accounts/local/rlorTrainerJobs").json()["rlorTrainerJobs"]) == jobs_before + 1
    job = http.get(f"/v1/accounts/local/rlorTrainerJobs/{service.trainer_job_id}").json()
    assert job["trainingConfig"]["loraRank"] == RANK
    base = logprobs(reference, data)
    assert logprobs(training, data) == base  # B starts at zero: the adapted model is the base

    for _ in range(3):
        training.forward_backward(data, "cross_entropy").result()
        training.optim_step(tinker.AdamParams(learning_rate=1e-2)).result()
    assert logprobs(training, data) != base
    assert logprobs(reference, data) == base  # the base weights never moved

    held = http.get(f"/training/v1/rlorTrainerJobs/local/{service.trainer_job_id}/api/v1/local/optimizer").json()
    assert held["optimizer_parameters"] == held["trainable_parameters"] < held["parameters"] / 5
    assert held["lora_rank"] == RANK and held["optimizer_state_bytes"] > 0

    # Under LoRA the SDK asks for standalone ("base") snapshots: the adapter alone.
    step = 3
    saved = training.save_weights_for_sampler(f"step_{step:05d}").result()
    assert saved.path.startswith("step_00003-")
    rows = {row["name"].rsplit("/", 1)[-1]: row for row in service.list_checkpoints(service.trainer_job_id)}
    assert rows[saved.path]["checkpointType"] == "CHECKPOINT_TYPE_INFERENCE_LORA"
    sampling = training.create_sampling_client(saved.path)
    # The deployment merged the adapter into the same base: the same bits the trainer serves...
    assert (sdk_helpers.digest_deployment(http, service.deployment_id)
            == sdk_helpers.digest_trainer(http, service.trainer_job_id))
    # ...and at temperature 1 each sampled token's logprob is the trainer's, to float tolerance.
    response = sampling.sample(tinker.ModelInput.from_ints(prompt), 1,
                               tinker.SamplingParams(max_tokens=6, temperature=1.0, seed=11)).result()
    tokens, sampled = list(response.sequences[0].tokens), response.sequences[0].logprobs
    full = prompt + tokens
    datum = tinker.Datum(model_input=tinker.ModelInput.from_ints(full[:-1]), loss_fn_inputs={
        "target_tokens": tinker.TensorData(data=full[1:], dtype="int64", shape=[len(full) - 1])})
    trained = logprobs(training, [datum])[len(prompt) - 1:]
    assert len(trained) == len(sampled) == len(tokens)
    for ours, theirs in zip(trained, sampled):
        assert math.isclose(ours, theirs, abs_tol=1e-4)

    # Promotion: a PEFT add-on model that lists its source snapshot, served by a new deployment.
    row = rows[saved.path]
    model_id = f"lora-{sdk_helpers.unique_deployment_id('m')}"
    promoted = service.promote_checkpoint(name=row["name"], output_model_id=model_id, base_model=TINY)
    listed = http.get(f"/v1/{promoted['name']}").json()
    assert listed["kind"] == "HF_PEFT_ADDON" and listed["peftDetails"]["r"] == RANK
    assert listed["sourceSnapshot"]["snapshot"] == saved.path
    assert listed["sourceCheckpoint"] == row["name"]
    serving_id = sdk_helpers.unique_deployment_id("promoted")
    created = http.post(f"/v1/accounts/local/deployments?deploymentId={serving_id}",
                        json={"baseModel": promoted["name"]})
    assert created.status_code == 200, created.text
    try:
        sampler = DeploymentSampler(inference_url=service_info.base_url, api_key="local", tokenizer=tokenizer,
                                    model=f"accounts/local/deployments/{serving_id}")
        completions = asyncio.run(sampler.sample_with_tokens(messages=[{"role": "user", "content": "ping"}],
                                                             n=1, max_tokens=4, temperature=0.0))
        assert completions[0].completion_len >= 1
        assert (sdk_helpers.digest_deployment(http, serving_id)
                == sdk_helpers.digest_deployment(http, service.deployment_id))
    finally:
        http.delete(f"/v1/accounts/local/deployments/{serving_id}")


def test_lora_state_round_trips_adapters_and_optimizer_across_jobs(provision, batch, http):
    _, data = batch
    adam = tinker.AdamParams(learning_rate=1e-2)
    first = lora_service(provision)
    training = first.create_training_client(lora_rank=RANK)
    for _ in range(2):
        training.forward_backward(data, "cross_entropy").result()
        training.optim_step(adam).result()
    state = training.save_state("step_00002").result()
    # The SDK only loads DNS-label paths; the seed's name comes back as a reference it accepts.
    assert state.path.startswith("cross_job://")
    info = RestClient(training.holder, serverless=True).get_weights_info_by_tinker_path(state.path).result()
    assert (info.base_model, info.is_lora, info.lora_rank) == (TINY, True, RANK)
    expected_loss = training.forward_backward(data, "cross_entropy").result().metrics["loss:sum"]
    expected_step = training.optim_step(adam).result().metrics

    # A second trainer job resumes from the first job's state, optimizer included.
    second = lora_service(provision)
    resumed = second.create_training_client_from_state_with_optimizer(state.path)
    assert second.trainer_job_id != first.trainer_job_id
    assert resumed.forward_backward(data, "cross_entropy").result().metrics["loss:sum"] == expected_loss
    assert resumed.optim_step(adam).result().metrics == expected_step

    # Weights only: same adapters, fresh moments, so the next step differs.
    third = lora_service(provision)
    weights_only = third.create_training_client_from_state(state.path)
    assert weights_only.forward_backward(data, "cross_entropy").result().metrics["loss:sum"] == expected_loss
    assert weights_only.optim_step(adam).result().metrics["grad_norm"] == expected_step["grad_norm"]

    # A full-parameter trainer cannot load adapters: a clear error naming the rank.
    full = provision(base_model=TINY, training_shape_id="accounts/fireworks/trainingShapes/ts-local-tiny")
    with pytest.raises(Exception, match="lora rank mismatch.*lora_rank=4.*lora_rank=0"):
        full.create_training_client().load_state(state.path).result()
    assert http.get("/local/v1/healthz").status_code == 200


def test_lora_bad_input_is_a_clear_error_and_the_service_serves_on(provision, batch, http, service_info):
    from fireworks.training.sdk import TrainerJobManager

    shapes = TrainerJobManager(api_key="local", base_url=service_info.base_url)
    assert shapes.resolve_training_profile(LORA_SHAPE).supports_lora
    assert not shapes.resolve_training_profile(service_info.training_shape_id).supports_lora
    with pytest.raises(Exception, match="loraRank=65 exceeds the largest rank the training shape allows \\(64\\)"):
        lora_service(provision, lora_rank=65).create_training_client(lora_rank=65)
    with pytest.raises(Exception, match="loraRank=4: training shape .*ts-local-tiny.* without LoRA.*ts-local-tiny-lora"):
        lora_service(provision, training_shape_id="accounts/fireworks/trainingShapes/ts-local-tiny").create_training_client(
            lora_rank=RANK)

    # An adapter snapshot hot-loaded into a deployment of a full-parameter trainer.
    _, data = batch
    lora = lora_service(provision)
    adapter = lora.create_training_client(lora_rank=RANK).save_weights_for_sampler("adapter").result()
    full = provision(base_model=TINY, training_shape_id="accounts/fireworks/trainingShapes/ts-local-tiny")
    full.create_training_client()
    refused = http.post("/hot_load/v1/models/hot_load", headers={
        "fireworks-deployment": f"accounts/local/deployments/{full.deployment_id}"},
        json={"identity": adapter.path})
    assert refused.status_code == 400
    assert "is a LoRA adapter (rank 4)" in refused.json()["error"]["message"]
    assert "full-parameter trainer" in refused.json()["error"]["message"]
    assert http.get("/local/v1/healthz").status_code == 200
