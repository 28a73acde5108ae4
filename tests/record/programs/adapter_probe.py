"""Every access of ``firetitan_track.sdk_adapter``, in whichever SDK release this Python has,
against a running local service; prints what each gave as one JSON object.

    python adapter_probe.py BASE_URL TOKENIZER SHAPE DEPLOYMENT_ID
"""

import json
import sys

import tinker  # Thinking Machines' types: 0.23 with fireworks-ai 1.2.24, 0.38 with 1.2.30

try:
    from fireworks.training import tinker as sdk_types  # 1.2.30 takes its own types
except ImportError:
    sdk_types = tinker  # 1.2.24 takes tinker 0.23's
from fireworks.training.sdk import FiretitanServiceClient, TrainerJobManager

from firetitan_track import sdk_adapter

base_url, tokenizer_path, shape, deployment_id = sys.argv[1:5]
service = FiretitanServiceClient.from_firetitan_config(
    api_key="local", base_url=base_url, base_model="accounts/fireworks/models/qwen3-8b",
    tokenizer_model=tokenizer_path, lora_rank=0, training_shape_id=shape, deployment_id=deployment_id,
    learning_rate=1e-3, replica_count=1, gradient_accumulation_steps=None, cleanup_trainer_on_close=True,
    cleanup_deployment_on_close="scale_to_zero")
out = {"versions": sdk_adapter.sdk_versions(),
       "config_base_model": sdk_adapter.managed_config(service).base_model,
       "handle_before": sdk_adapter.managed_handle(service) is not None,
       "base_url": sdk_adapter.managed_base_url(service),
       "trainer_before": sdk_adapter.trainer_job_id(service)}
client = service.create_training_client()
handle = sdk_adapter.managed_handle(service)
out.update(trainer=sdk_adapter.trainer_job_id(service), public_trainer=service.trainer_job_id,
           deployment=sdk_adapter.deployment_id(service), reattached=sdk_adapter.deployment_reattached(service),
           reference=sdk_adapter.reference_job_id(service), kind_first=sdk_adapter.next_snapshot_kind(client, None))
service.create_reference_client()  # a full-parameter policy's reference: a frozen trainer of its own
out["reference_after"] = sdk_adapter.reference_job_id(service)
client.save_weights_for_sampler("probe").result()
out.update(kind_next=sdk_adapter.next_snapshot_kind(client, None),
           kind_asked=sdk_adapter.next_snapshot_kind(client, "base"),
           replicas=sdk_adapter.deployment_record(handle, deployment_id).get("maxReplicaCount"),
           no_deployment=sdk_adapter.deployment_record(handle, "no-such-deployment"),
           cleanup_config=list(sdk_adapter.cleanup_flags(sdk_adapter.managed_config(service))),
           cleanup_handle=list(sdk_adapter.cleanup_flags(handle)))
manager = TrainerJobManager(api_key="local", base_url=base_url)
out["no_model_status"] = sdk_adapter.rest_get(manager, f"/v1/accounts/{manager.account_id}/models/no-such").status_code
tokens = [1, 2, 3, 4]
datum = sdk_types.Datum(model_input=sdk_types.ModelInput.from_ints(tokens[:-1]),
                        loss_fn_inputs={"target_tokens": sdk_types.TensorData(data=tokens[1:], dtype="int64", shape=[3]),
                                        "weights": sdk_types.TensorData(data=[1.0] * 3, dtype="float32", shape=[3])})
client.forward_backward([datum], "cross_entropy").result()
step = client.optim_step(sdk_adapter.adam_params(tinker.AdamParams(learning_rate=1e-3))).result()  # the SDK takes it
out.update(optim_metrics=sorted(step.metrics), optimizer=sdk_adapter.optimizer_fields(tinker.AdamParams(learning_rate=2e-3)))
service.close()
out["closed_replicas"] = sdk_adapter.deployment_record(handle, deployment_id).get("maxReplicaCount")
print(json.dumps(out))
