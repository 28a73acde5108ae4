"""Bad input gets a 4xx with a message (through the SDK and on the raw wire) and the
service keeps serving; cleanup policies do what they say, visibly."""

from __future__ import annotations

import asyncio

import pytest
from fireworks.training import tinker
from fireworks.training.sdk import APIStatusError, DeploymentManager, TrainerJobManager

VOCAB = 259  # the local byte tokenizer: 256 bytes + 3 specials


def _datum(tokens, loss_weights=None):
    return tinker.Datum(model_input=tinker.ModelInput.from_ints(tokens[:-1]),
                        loss_fn_inputs={"target_tokens": tinker.TensorData(data=tokens[1:], dtype="int64",
                                                                           shape=[len(tokens) - 1])})


@pytest.mark.parametrize("data, loss_fn, message", [
    ([_datum([1, 2, VOCAB + 5, 3])], "cross_entropy", "outside the vocabulary"),
    ([_datum(list(range(200)) * 3)], "cross_entropy", "context length"),
    ([_datum(list(b"hello there"))], "no_such_loss", "unknown loss function"),
], ids=["token-outside-vocab", "context-too-long", "unknown-loss"])
def test_bad_input_through_the_sdk_is_a_400_with_a_message(provision, data, loss_fn, message):
    service = provision()
    training = service.create_training_client()
    with pytest.raises(APIStatusError, match=message) as failure:
        training.forward_backward(data, loss_fn).result()
    assert failure.value.status_code == 400
    # The SDK then fails that model's request sequence (its rule); the trainer itself serves on.
    other = provision(trainer_job_id=service.trainer_job_id, deployment_id=service.deployment_id)
    good = [_datum(list(b"hello there"))]
    assert other.create_training_client().forward_backward(good, "cross_entropy").result().metrics["loss:sum"] > 0


def test_bad_request_burst_then_good_request(service_info, provision, http):
    service = provision()
    training = service.create_training_client()
    job = service.trainer_job_id
    model_id = training.model_id
    api = f"/training/v1/rlorTrainerJobs/local/{job}/api/v1"

    def datum(tokens):
        return {"model_input": {"chunks": [{"type": "encoded_text", "tokens": tokens[:-1]}]},
                "loss_fn_inputs": {"target_tokens": {"data": tokens[1:], "dtype": "int64",
                                                     "shape": [len(tokens) - 1]}}}

    def fb(data, loss_fn="cross_entropy"):
        return {"model_id": model_id, "forward_backward_input": {"data": data, "loss_fn": loss_fn}}

    bad = [
        ("POST", "/v1/accounts/local/rlorTrainerJobs?rlorTrainerJobId=x-1", b"{not json", 400, "malformed JSON"),
        ("POST", "/v1/accounts/local/rlorTrainerJobs?rlorTrainerJobId=x-2",
         {"trainingConfig": {"baseModel": "accounts/fireworks/models/nope"}}, 400, "unknown base model"),
        ("POST", "/v1/accounts/local/rlorTrainerJobs?rlorTrainerJobId=x-3&trainingShape="
                 "accounts/fireworks/trainingShapes/ts-nope",
         {"trainingConfig": {"baseModel": service_info.base_model}}, 400, "unknown training shape"),
        ("GET", "/v1/accounts/fireworks/trainingShapes/ts-nope/versions?filter=latest_validated%3Dtrue", None,
         404, "not found"),
        ("GET", "/v1/accounts/local/rlorTrainerJobs/no-such-job", None, 404, "not found"),
        ("POST", "/v1/accounts/local/rlorTrainerJobs/no-such-job:resume", None, 404, "not found"),
        ("GET", "/v1/accounts/local/deployments/no-such-deployment", None, 404, "not found"),
        ("GET", "/v1/accounts/fireworks/models/no-such-model", None, 404, "not found"),
        ("GET", "/training/v1/rlorTrainerJobs/local/no-such-job/api/v1/healthz", None, 404, "not found"),
        ("POST", f"{api}/forward_backward", b"[1, 2", 400, "malformed JSON"),
        ("POST", f"{api}/forward_backward", fb([datum([1, 2, VOCAB])]), 400, "outside the vocabulary"),
        ("POST", f"{api}/forward_backward", fb([datum([-1, 2, 3])]), 400, "outside the vocabulary"),
        ("POST", f"{api}/forward_backward", fb([datum(list(range(256)) * 3)]), 400, "context length"),
        ("POST", f"{api}/forward_backward", fb([datum([1, 2, 3])], "no_such_loss"), 400, "unknown loss function"),
        ("POST", f"{api}/forward_backward", {"model_id": "nope", "forward_backward_input": {}}, 404, "unknown model_id"),
        ("POST", f"{api}/retrieve_future", {"request_id": "nope"}, 404, "unknown request_id"),
        ("POST", f"{api}/optim_step", {"model_id": model_id, "adam_params": {"learning_rate": "fast"}}, 400,
         "must be a number"),
        ("POST", "/inference/v1/completions", {"model": "accounts/local/deployments/nope", "prompt": [1]}, 404,
         "not found"),
        ("POST", "/inference/v1/completions",
         {"model": f"accounts/local/deployments/{service.deployment_id}", "prompt": [1, VOCAB + 1]}, 400,
         "outside the vocabulary"),
        ("POST", "/inference/v1/completions",
         {"model": f"accounts/local/deployments/{service.deployment_id}", "prompt": [1] * 600}, 400,
         "context length"),
        ("POST", "/hot_load/v1/models/hot_load", {"identity": "no-such-snapshot"}, 400, "deployment"),
        ("GET", "/no/such/path", None, 404, "Not Found"),
    ]
    for method, path, body, status, message in bad * 3:  # a burst: every bad request three times
        kwargs = {"content": body} if isinstance(body, bytes) else ({"json": body} if body is not None else {})
        resp = http.request(method, path, **kwargs)
        assert resp.status_code == status, (path, resp.text)
        assert message.lower() in resp.json()["error"]["message"].lower(), (path, resp.text)

    # ...and the service still serves, through the SDK.
    data = [_datum(list(b"still alive"))]
    assert training.forward_backward(data, "cross_entropy").result().metrics["loss:sum"] > 0
    training.optim_step(tinker.AdamParams(learning_rate=1e-3)).result()
    saved = training.save_weights_for_sampler("after-burst").result()
    sampler = service.create_deployment_sampler(model_path=saved.path)
    completions = asyncio.run(sampler.sample_with_prompt_tokens([1, 2, 3], n=2, max_tokens=4))
    assert len(completions) == 2


def test_cleanup_policies_are_visible_in_the_control_plane(service_info, provision, http):
    kept = provision(cleanup_trainer_on_close=False, cleanup_deployment_on_close=None)
    kept.create_training_client()
    scaled = provision(cleanup_trainer_on_close=True, cleanup_deployment_on_close="scale_to_zero")
    scaled.create_training_client()
    deleted = provision(cleanup_trainer_on_close=True, cleanup_deployment_on_close="delete")
    deleted.create_training_client()
    ids = {name: (svc.trainer_job_id, svc.deployment_id) for name, svc in
           (("kept", kept), ("scaled", scaled), ("deleted", deleted))}
    for svc in (kept, scaled, deleted):
        svc.close()

    def job(name):
        return http.get(f"/v1/accounts/local/rlorTrainerJobs/{ids[name][0]}").json()

    def deployment(name):
        return http.get(f"/v1/accounts/local/deployments/{ids[name][1]}")

    assert job("kept")["state"] == "JOB_STATE_RUNNING"
    assert deployment("kept").json()["replicaCount"] == 1
    assert job("scaled")["state"] == "JOB_STATE_DELETED"
    assert (deployment("scaled").json()["maxReplicaCount"], deployment("scaled").json()["replicaCount"]) == (0, 0)
    assert job("deleted")["state"] == "JOB_STATE_DELETED"
    assert deployment("deleted").status_code == 404
    # A deleted trainer's data plane is gone; its tombstone blocks reusing the id.
    assert http.get(f"/training/v1/rlorTrainerJobs/local/{ids['deleted'][0]}/api/v1/healthz").status_code == 404
    with pytest.raises(RuntimeError, match="archived|Conflict|already exists|deleted"):
        from fireworks.training.sdk import TrainerJobConfig
        TrainerJobManager(api_key="local", base_url=service_info.base_url).create(
            TrainerJobConfig(base_model=service_info.base_model, requested_job_id=ids["deleted"][0]))
    TrainerJobManager(api_key="local", base_url=service_info.base_url).delete(ids["kept"][0])
    DeploymentManager(api_key="local", base_url=service_info.base_url).delete(ids["kept"][1])
    assert job("kept")["state"] == "JOB_STATE_DELETED" and deployment("kept").status_code == 404


def test_an_unexpected_exception_is_a_500_with_its_message_and_the_app_serves_on(tmp_path):
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from runner.local.server import build_app

    async def broken(request):
        raise KeyError("a bug")

    app = build_app(tmp_path)
    app.router.routes.append(Route("/local/v1/broken", broken))
    with TestClient(app, raise_server_exceptions=False) as client:
        resp = client.get("/local/v1/broken")
        assert resp.status_code == 500
        assert "KeyError" in resp.json()["error"]["message"] and "a bug" in resp.json()["error"]["message"]
        assert client.get("/local/v1/healthz").json() == {"status": "ok"}
