"""Persistence: kill the service with SIGKILL mid-run, start it again on the same
state dir, reconnect with the old trainer_job_id and deployment_id, load the saved
state and train on -- and the next step is exactly the step the first run took."""

from __future__ import annotations

import asyncio

from fireworks.training import tinker
from runner.local import supervisor as local_service

ADAM = tinker.AdamParams(learning_rate=1e-2, grad_clip_norm=1.0)


# Phase one runs in its own client process that dies with the service (os._exit, no
# close): a crashed run, as the runner will see it. (Closing an SDK service client
# whose server is gone also takes ~30 s of telemetry drain in fireworks-ai 1.2.30.)
FIRST_RUN = r"""
import json, os, sys
sys.path.insert(0, sys.argv[1])
import conftest as helpers
from fireworks.training import tinker
from runner.local.supervisor import LocalServiceInfo
from transformers import AutoTokenizer

info = LocalServiceInfo(**json.loads(sys.argv[2]))
deployment_id = sys.argv[3]
tokenizer = AutoTokenizer.from_pretrained(info.tokenizer_path)
adam = tinker.AdamParams(learning_rate=1e-2, grad_clip_norm=1.0)
end = tokenizer.convert_tokens_to_ids("<|im_end|>")
batch = [helpers.sft_datum(helpers.chat_prompt(tokenizer, "ping"), list(b"pong") + [end])]
service = helpers.make_service(info, deployment_id=deployment_id, cleanup_trainer_on_close=False,
                               cleanup_deployment_on_close=None)
training = service.create_training_client()
for _ in range(3):
    training.forward_backward(batch, "cross_entropy").result()
    training.optim_step(adam).result()
training.save_state("step-3").result()
snapshot = training.save_weights_for_sampler("step-3").result()
service.create_deployment_sampler(model_path=snapshot.path, tokenizer=tokenizer)
loss = training.forward_backward(batch, "cross_entropy").result().metrics["loss:sum"]
step = training.optim_step(adam).result().metrics
print(json.dumps({"trainer_job_id": service.trainer_job_id, "snapshot": snapshot.path, "loss": loss, "step": step}))
sys.stdout.flush()
os._exit(0)
"""


def test_restart_after_kill_then_reconnect_and_train_on(tmp_path, tokenizer, sdk_helpers):
    import dataclasses
    import json
    import subprocess
    import sys
    from pathlib import Path

    import httpx

    state_dir = tmp_path / "state"
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    batch = [sdk_helpers.sft_datum(sdk_helpers.chat_prompt(tokenizer, "ping"), list(b"pong") + [end])]
    deployment_id = sdk_helpers.unique_deployment_id("restart")

    info = local_service.start(state_dir)
    try:
        run = subprocess.run([sys.executable, "-c", FIRST_RUN, str(Path(__file__).parent),
                              json.dumps(dataclasses.asdict(info)), deployment_id],
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        first = json.loads(run.stdout.strip().splitlines()[-1])
    finally:
        local_service.kill(state_dir)  # SIGKILL: no shutdown hooks run

    info = local_service.start(state_dir)
    try:
        job_url = f"{info.base_url}/v1/accounts/local/rlorTrainerJobs/{first['trainer_job_id']}"
        assert httpx.get(job_url).json()["state"] == "JOB_STATE_PAUSED"  # weights died with the process
        second = sdk_helpers.make_service(info, trainer_job_id=first["trainer_job_id"], deployment_id=deployment_id,
                                          cleanup_trainer_on_close=False, cleanup_deployment_on_close=None)
        training = second.create_training_client()  # the SDK resumes the paused job
        assert second.trainer_job_id == first["trainer_job_id"]
        assert httpx.get(job_url).json()["state"] == "JOB_STATE_RUNNING"
        assert "step-3" in training.list_checkpoints()
        training.load_state_with_optimizer("step-3").result()
        assert training.forward_backward(batch, "cross_entropy").result().metrics["loss:sum"] == first["loss"]
        assert training.optim_step(ADAM).result().metrics == first["step"]

        # The deployment came back serving the snapshot it held before the kill.
        status = httpx.get(f"{info.base_url}/hot_load/v1/models/hot_load",
                           headers={"fireworks-deployment": f"accounts/local/deployments/{deployment_id}"}).json()
        assert status["replicas"][0]["current_snapshot_identity"] == first["snapshot"]
        saved = training.save_weights_for_sampler("step-5").result()
        sampler = second.create_deployment_sampler(model_path=saved.path, tokenizer=tokenizer)
        completions = asyncio.run(sampler.sample_with_tokens(messages=[{"role": "user", "content": "ping"}],
                                                             n=1, max_tokens=8, temperature=0.0))
        assert completions and completions[0].completion_len >= 1
        second.close()
    finally:
        local_service.stop(state_dir)
