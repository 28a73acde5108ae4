"""Training semantics seen through the SDK: learning a small task, base/delta weight
sync that is exact bit for bit, and a DCP state round trip that changes nothing."""

from __future__ import annotations

import asyncio

from fireworks.training import tinker

ADAM = tinker.AdamParams(learning_rate=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, grad_clip_norm=1.0)
TASK = {"ping": "pong", "red": "blue", "cat": "meow"}


def _task_data(tokenizer, sdk_helpers):
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return [sdk_helpers.sft_datum(sdk_helpers.chat_prompt(tokenizer, question), list(answer.encode()) + [end])
            for question, answer in TASK.items()]


def test_loss_falls_and_greedy_output_becomes_right(provision, tokenizer, sdk_helpers):
    service = provision()
    training = service.create_training_client()
    data = _task_data(tokenizer, sdk_helpers)
    losses = []
    for _ in range(30):
        losses.append(training.forward_backward(data, "cross_entropy").result().metrics["loss:sum"])
        training.optim_step(ADAM).result()
    assert losses[-1] < 0.05 * losses[0], losses

    saved = training.save_weights_for_sampler("learned").result()
    sampler = service.create_deployment_sampler(model_path=saved.path, tokenizer=tokenizer)

    async def answer_all():
        return await asyncio.gather(*(
            sampler.sample_with_tokens(messages=[{"role": "user", "content": q}], n=1, max_tokens=12,
                                       temperature=0.0)
            for q in TASK))

    answers = [completions[0] for completions in asyncio.run(answer_all())]
    for (question, expected), completion in zip(TASK.items(), answers):
        assert completion.finish_reason == "stop", (question, completion.text)
        assert completion.text.replace("<|im_end|>", "") == expected, (question, completion.text)


def test_base_then_delta_sync_is_bit_exact(provision, tokenizer, http, sdk_helpers):
    service = provision()
    training = service.create_training_client()
    job_id, deployment_id = service.trainer_job_id, service.deployment_id
    data = _task_data(tokenizer, sdk_helpers)

    def train(steps: int) -> None:
        for _ in range(steps):
            training.forward_backward(data, "cross_entropy").result()
            training.optim_step(ADAM).result()

    base_weights = sdk_helpers.digest_deployment(http, deployment_id)
    train(2)
    base = training.save_weights_for_sampler("sync-a").result()
    trainer_a = sdk_helpers.digest_trainer(http, job_id)
    service.create_deployment_sampler(model_path=base.path, tokenizer=tokenizer)
    assert sdk_helpers.digest_deployment(http, deployment_id) == trainer_a != base_weights

    for name in ("sync-b", "sync-c"):  # deltas against the base
        train(2)
        delta = training.save_weights_for_sampler(name).result()
        trainer_digest = sdk_helpers.digest_trainer(http, job_id)
        service.create_deployment_sampler(model_path=delta.path, tokenizer=tokenizer)
        assert sdk_helpers.digest_deployment(http, deployment_id) == trainer_digest != trainer_a

    kinds = {row["name"].rsplit("/", 1)[-1]: row["checkpointType"] for row in service.list_checkpoints(job_id)}
    assert kinds[base.path] == "CHECKPOINT_TYPE_INFERENCE_BASE"
    assert kinds[delta.path] == "CHECKPOINT_TYPE_INFERENCE_ARC_V2"
    status = http.get("/hot_load/v1/models/hot_load",
                      headers={"fireworks-deployment": f"accounts/local/deployments/{deployment_id}"}).json()
    assert status["replicas"][0]["current_snapshot_identity"] == delta.path
    assert status["replicas"][0]["readiness"] is True


def test_state_round_trip_changes_nothing(provision, tokenizer, http, sdk_helpers):
    service = provision()
    training = service.create_training_client()
    job_id = service.trainer_job_id
    data = _task_data(tokenizer, sdk_helpers)
    for _ in range(2):
        training.forward_backward(data, "cross_entropy").result()
        training.optim_step(ADAM).result()
    training.save_state("round-trip").result()

    def step():
        loss = training.forward_backward(data, "cross_entropy").result().metrics["loss:sum"]
        metrics = training.optim_step(ADAM).result().metrics
        return loss, metrics, sdk_helpers.digest_trainer(http, job_id)

    straight = [step(), step()]
    training.load_state_with_optimizer("round-trip").result()
    assert [step(), step()] == straight

    # Weights-only load resets the optimizer: the first step then differs.
    training.load_state("round-trip").result()
    assert step()[2] != straight[0][2]


def test_chunked_requests_sent_in_parallel_run_in_sequence(provision):
    """Over 1024 datums the SDK splits a call into chunks with consecutive seq_ids and
    sends them concurrently; the trainer must run them in seq_id order."""
    service = provision()
    training = service.create_training_client()
    data = [tinker.Datum(model_input=tinker.ModelInput.from_ints([i % 250, (i * 7) % 250]),
                         loss_fn_inputs={"target_tokens": tinker.TensorData(data=[(i * 7) % 250, (i * 3) % 250],
                                                                            dtype="int64", shape=[2])})
            for i in range(1100)]
    forward = training.forward(data, "cross_entropy").result()
    backward = training.forward_backward(data, "cross_entropy").result()
    assert len(forward.loss_fn_outputs) == len(backward.loss_fn_outputs) == 1100
    assert abs(forward.metrics["loss:sum"] - backward.metrics["loss:sum"]) < 1e-3 * forward.metrics["loss:sum"]
    step = training.optim_step(ADAM).result()
    assert step.metrics["num_loss_tokens"] == 2200.0  # both chunks' gradients reached the step
