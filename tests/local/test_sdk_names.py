"""Names as the managed service takes them, through the unmodified SDK: every snapshot,
state and checkpoint name of letters (both cases), digits, '.', '_' and '-' works end to
end; only names that could leave the state dir are refused, with a 400 naming the rule.
And a promoted full-parameter snapshot is a model a new deployment serves."""

from __future__ import annotations

import pytest
from fireworks.training import tinker
from fireworks.training.sdk._core import APIStatusError


def test_managed_names_work_end_to_end_and_escaping_ones_are_refused(provision, tokenizer, http, sdk_helpers,
                                                                    service_info):
    prompt = sdk_helpers.chat_prompt(tokenizer, "hi")
    data = [sdk_helpers.sft_datum(prompt, list(b"yo") + [tokenizer.convert_tokens_to_ids("<|im_end|>")])]
    adam = tinker.AdamParams(learning_rate=1e-2)
    service = provision()
    training = service.create_training_client()
    training.forward_backward(data, "cross_entropy").result()
    training.optim_step(adam).result()

    # Sampler snapshots: the seed's names and the managed service's other characters.
    for name in ("step_00001", "Run.A_v2-final"):
        saved = training.save_weights_for_sampler(name).result()
        assert saved.path.startswith(f"{name}-")
        training.create_sampling_client(saved.path)  # hot-loaded by the deployment
    assert (sdk_helpers.digest_deployment(http, service.deployment_id)
            == sdk_helpers.digest_trainer(http, service.trainer_job_id))

    # States: names that are not DNS labels come back as paths the SDK's load_state accepts,
    # and two names that differ only in case or punctuation stay two states.
    first = training.save_state("step_00001").result()
    loss_at_first = training.forward(data, "cross_entropy").result().metrics["loss:sum"]
    training.forward_backward(data, "cross_entropy").result()
    training.optim_step(adam).result()
    second = training.save_state("Step.00001").result()
    assert first.path != second.path
    training.load_state_with_optimizer(first.path).result()
    assert training.forward(data, "cross_entropy").result().metrics["loss:sum"] == loss_at_first
    assert {"step_00001", "Step.00001"} <= set(training.list_checkpoints())

    # Refused: what could escape the state dir or meet our temporary files; the trainer serves on.
    for bad, what in (("../escape", "sampler snapshot"), (".hidden", "sampler snapshot")):
        with pytest.raises(APIStatusError, match=f"{what} name .* is refused: names are letters, digits"):
            training.save_weights_for_sampler(bad).result()
    for bad in ("a/b", "x" * 201):
        with pytest.raises(Exception, match="checkpoint name .* is refused: names are letters, digits"):
            training.save_state(bad).result()
    assert training.forward(data, "cross_entropy").result().metrics["loss:sum"] == loss_at_first
    training.forward_backward(data, "cross_entropy").result()
    training.optim_step(adam).result()

    # Promotion of a full-parameter snapshot: listed with its source, served by a new deployment.
    rows = {row["name"].rsplit("/", 1)[-1]: row for row in service.list_checkpoints(service.trainer_job_id)}
    source = next(row for name, row in rows.items() if name.startswith("Run.A_v2-final-"))
    model_id = f"promoted-{sdk_helpers.unique_deployment_id('full')}"
    promoted = service.promote_checkpoint(name=source["name"], output_model_id=model_id,
                                          base_model=service_info.base_model)
    listed = http.get(f"/v1/{promoted['name']}").json()
    assert listed["kind"] == "HF_BASE_MODEL" and listed["sourceCheckpoint"] == source["name"]
    assert listed["sourceSnapshot"]["snapshot"] == source["name"].rsplit("/", 1)[-1]
    serving_id = sdk_helpers.unique_deployment_id("serve")
    assert http.post(f"/v1/accounts/local/deployments?deploymentId={serving_id}",
                     json={"baseModel": promoted["name"]}).status_code == 200
    try:
        completion = http.post("/inference/v1/completions", json={
            "model": f"accounts/local/deployments/{serving_id}", "prompt": prompt, "max_tokens": 3,
            "temperature": 0.0})
        assert completion.status_code == 200, completion.text
        # The snapshot was taken after one step; the trainer has moved on since, the deployment has not.
        assert sdk_helpers.digest_deployment(http, serving_id) != sdk_helpers.digest_trainer(
            http, service.trainer_job_id)
        training.load_state(first.path).result()  # the state saved right after that snapshot
        assert sdk_helpers.digest_deployment(http, serving_id) == sdk_helpers.digest_trainer(
            http, service.trainer_job_id)
    finally:
        http.delete(f"/v1/accounts/local/deployments/{serving_id}")
