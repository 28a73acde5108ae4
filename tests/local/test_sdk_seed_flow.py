"""THE acceptance test: the seed's research loop, through the unmodified SDK, against
the local service; then the rest of the SDK surface a recipe uses (reference client,
Tinker-shaped sampling client, DCP state, checkpoint listing and promotion,
reconnecting to an existing trainer job and deployment).

SDK quirk (fireworks-ai 1.2.30 + tinker 0.38): ``optim_step`` rejects Thinking
Machines' ``tinker.AdamParams`` (a pydantic "valid dictionary or instance of
AdamParams" error); the SDK's own alias ``from fireworks.training import tinker``
works, so the seed's ``tinker.`` names come from there.
"""

from __future__ import annotations

import asyncio
import math

from fireworks.training import tinker  # the SDK's alias of the Tinker types (see the module docstring)
from fireworks.training.sdk import FiretitanServiceClient
from fireworks.training.sdk.concurrency import AdaptiveConcurrencyController
from transformers import AutoTokenizer


def test_seed_flow_runs_unmodified(service_info, http, sdk_helpers):
    info, chat_prompt, sft_datum = service_info, sdk_helpers.chat_prompt, sdk_helpers.sft_datum
    # --- the seed, as written (only `tinker` is the SDK's alias) -------------------------
    # Changed from the seed: base_url, api_key and tokenizer_model (the path `local up` printed).
    # Its own base model and training shape, the managed service's names, resolve locally.
    service = FiretitanServiceClient.from_firetitan_config(
        api_key="local", base_url=info.base_url, base_model="accounts/fireworks/models/qwen3-8b",
        tokenizer_model=info.tokenizer_path, lora_rank=0,
        training_shape_id="accounts/fireworks/trainingShapes/qwen3-8b-128k-h200", deployment_id="research-serving",
        learning_rate=1e-3, replica_count=1, cleanup_trainer_on_close=True,
        cleanup_deployment_on_close="scale_to_zero")
    tokenizer = AutoTokenizer.from_pretrained(info.tokenizer_path)
    training = service.create_training_client()
    sampler = service.create_deployment_sampler(tokenizer=tokenizer,
                                                concurrency_controller=AdaptiveConcurrencyController())

    prompt = chat_prompt(tokenizer, "What is 2+2?")
    data = [sft_datum(prompt, list(tokenizer.encode("4")) + [tokenizer.convert_tokens_to_ids("<|im_end|>")])]

    def loss_fn(data, logprobs_list):
        loss = sum(-(lp * d.loss_fn_inputs["weights"].to_torch()).sum() for d, lp in zip(data, logprobs_list))
        return loss, {"nll": float(loss.detach())}

    for step in range(2):
        result = training.forward_backward_custom(data, loss_fn).result()
        optim = training.optim_step(tinker.AdamParams(learning_rate=1e-3)).result()
        saved = training.save_weights_for_sampler(f"step_{step:05d}").result()
        sampler = service.create_deployment_sampler(model_path=saved.path, tokenizer=tokenizer,
                                                    concurrency_controller=AdaptiveConcurrencyController())
        completions = asyncio.run(sampler.sample_with_tokens(
            messages=[{"role": "user", "content": "What is 2+2?"}], n=4, max_tokens=16))
    trainer_job_id, deployment_id = service.trainer_job_id, service.deployment_id
    service.close()
    # --- what it produced ---------------------------------------------------------------
    assert math.isfinite(result.metrics["nll"]) and result.metrics["nll"] > 0
    assert result.metrics["loss:sum"] > 0
    assert optim.metrics["grad_norm"] > 0
    assert saved.path.startswith("step_00001-")  # the seed's own names, as the managed service takes them
    assert len(completions) == 4
    for completion in completions:
        assert completion.full_tokens[: completion.prompt_len] == prompt
        assert 1 <= completion.completion_len <= 16
        assert completion.finish_reason in ("stop", "length")
    # Cleanup policies took effect and are visible through the control plane.
    job = http.get(f"/v1/accounts/local/rlorTrainerJobs/{trainer_job_id}").json()
    assert job["state"] == "JOB_STATE_DELETED"
    deployment = http.get(f"/v1/accounts/local/deployments/{deployment_id}").json()
    assert (deployment["minReplicaCount"], deployment["maxReplicaCount"], deployment["replicaCount"]) == (0, 0, 0)
    assert deployment["state"] == "READY"
    assert job["trainingShape"] == "accounts/fireworks/trainingShapes/qwen3-8b-128k-h200/versions/v1"


def test_reference_sampling_client_state_checkpoints_and_reconnect(service_info, tokenizer, http, sdk_helpers):
    make_service, chat_prompt, sft_datum = sdk_helpers.make_service, sdk_helpers.chat_prompt, sdk_helpers.sft_datum
    deployment_id = sdk_helpers.unique_deployment_id("reconnect")
    first = make_service(service_info, deployment_id=deployment_id, cleanup_trainer_on_close=False,
                         cleanup_deployment_on_close=None)
    training = first.create_training_client()
    reference = first.create_reference_client()
    prompt = chat_prompt(tokenizer, "ping")
    batch = [sft_datum(prompt, list(b"pong") + [tokenizer.convert_tokens_to_ids("<|im_end|>")])]

    # The full-parameter reference is a separate forward-only trainer on the frozen base.
    assert first.reference_job_id not in (None, first.trainer_job_id)
    ref_job = http.get(f"/v1/accounts/local/rlorTrainerJobs/{first.reference_job_id}").json()
    assert ref_job["forwardOnly"] is True and ref_job["state"] == "JOB_STATE_RUNNING"
    ref_before = reference.forward(batch, "cross_entropy").result().loss_fn_outputs[0]["logprobs"].data
    policy_before = training.forward(batch, "cross_entropy").result().loss_fn_outputs[0]["logprobs"].data
    assert ref_before == policy_before  # same seeded base

    adam = tinker.AdamParams(learning_rate=1e-2)
    for _ in range(2):
        training.forward_backward(batch, "cross_entropy").result()
        training.optim_step(adam).result()
    assert reference.forward(batch, "cross_entropy").result().loss_fn_outputs[0]["logprobs"].data == ref_before
    assert training.forward(batch, "cross_entropy").result().loss_fn_outputs[0]["logprobs"].data != policy_before

    # DCP state, then one more step whose outcome the reconnected client must reproduce.
    state = training.save_state("after-2").result()
    assert state.path == "after-2"
    assert "after-2" in training.list_checkpoints()
    expected_loss = training.forward_backward(batch, "cross_entropy").result().metrics["loss:sum"]
    expected_step = training.optim_step(adam).result().metrics

    # Tinker-shaped sampling client on a saved snapshot.
    saved = training.save_weights_for_sampler("s3").result()
    sampling = training.create_sampling_client(saved.path)
    response = sampling.sample(tinker.ModelInput.from_ints(prompt), 2,
                               tinker.SamplingParams(max_tokens=8, temperature=1.0, seed=7)).result()
    assert len(response.sequences) == 2
    for sequence in response.sequences:
        assert len(sequence.tokens) == len(sequence.logprobs) >= 1

    # Control-plane checkpoint rows: sampler snapshots are promotable, DCP states are not.
    rows = {row["name"].rsplit("/", 1)[-1]: row for row in first.list_checkpoints(first.trainer_job_id)}
    assert rows["after-2"]["promotable"] is False and rows["after-2"]["checkpointType"] == "CHECKPOINT_TYPE_TRAINING"
    assert rows[saved.path]["promotable"] is True
    model = first.promote_checkpoint(name=rows[saved.path]["name"], output_model_id=f"promoted-{deployment_id}",
                                     base_model=service_info.base_model)
    assert model["state"] == "READY"
    assert http.get(f"/v1/{model['name']}").json()["name"] == model["name"]

    trainer_job_id = first.trainer_job_id
    first.close()  # keeps the trainer and the deployment (no cleanup configured)

    # Reconnect: the existing trainer job and deployment, a fresh session.
    second = make_service(service_info, trainer_job_id=trainer_job_id, deployment_id=deployment_id)
    try:
        training2 = second.create_training_client()
        assert second.trainer_job_id == trainer_job_id
        training2.load_state_with_optimizer("after-2").result()
        assert training2.forward_backward(batch, "cross_entropy").result().metrics["loss:sum"] == expected_loss
        assert training2.optim_step(adam).result().metrics == expected_step
        saved2 = training2.save_weights_for_sampler("resumed").result()
        sampler2 = second.create_deployment_sampler(model_path=saved2.path, tokenizer=tokenizer)
        completions = asyncio.run(sampler2.sample_with_tokens(messages=[{"role": "user", "content": "ping"}],
                                                              n=2, max_tokens=8, temperature=0.0))
        assert len(completions) == 2 and completions[0].full_tokens == completions[1].full_tokens
    finally:
        second.close()
    # The SDK cleans up only what a session created: the reused job and deployment stay.
    assert http.get(f"/v1/accounts/local/rlorTrainerJobs/{trainer_job_id}").json()["state"] == "JOB_STATE_RUNNING"
    assert http.get(f"/v1/accounts/local/deployments/{deployment_id}").status_code == 200
    from fireworks.training.sdk import DeploymentManager, TrainerJobManager
    TrainerJobManager(api_key="local", base_url=service_info.base_url).delete(trainer_job_id)
    DeploymentManager(api_key="local", base_url=service_info.base_url).delete(deployment_id)
    assert http.get(f"/v1/accounts/local/rlorTrainerJobs/{trainer_job_id}").json()["state"] == "JOB_STATE_DELETED"
    assert http.get(f"/v1/accounts/local/deployments/{deployment_id}").status_code == 404
