"""A loop written the cookbook's way (its service wiring, client and checkpoint manager from
``training.utils``), for killing mid-step (tests/record/test_crash.py).

Four optimizer steps of one datum each; a resumable checkpoint every two steps, with the
cookbook's ``data_consumed``. It resumes as a recipe does: from the newest resumable
checkpoint the control plane lists for its trainer (``TrainingCheckpoints.resume``). On
its first attempt (no READY_FILE yet) it stops in step 3, after the step's forward/backward
and before its optimizer step: it writes its pid to READY_FILE and waits to be killed.

    python crash_midstep.py BASE_URL TOKENIZER SHAPE LOG_PATH READY_FILE [TRAINER_JOB_ID]
"""

import os
import sys
import time

import tinker
from training.utils import ReconnectableClient, TrainerConfig, build_service_client
from training.utils.checkpoints import TrainingCheckpoints

base_url, tokenizer_path, shape, log_path, ready = sys.argv[1:6]
job_id = sys.argv[6] if len(sys.argv) > 6 else None  # reattach to the trainer the crashed attempt left
base_model = "accounts/fireworks/models/qwen3-8b"
service = build_service_client(api_key=os.environ["FIREWORKS_API_KEY"], base_url=base_url, additional_headers=None, base_model=base_model,
                               tokenizer_model=tokenizer_path, max_lora_rank=0, max_context_length=None,
                               learning_rate=1e-3, trainer=TrainerConfig(training_shape_id=shape, job_id=job_id),
                               cleanup_trainer_on_close=True)
training = service.create_training_client(base_model, lora_rank=0)
client = ReconnectableClient.from_training_client(training, base_model=base_model, job_id=service.trainer_job_id,
                                                  service=service)
checkpoints = TrainingCheckpoints(client, service, trainer_id=service.trainer_job_id, log_path=log_path,
                                  save_stabilize_s=0.0, save_poll_s=0.2)
resumed = checkpoints.resume()
step, consumed = (resumed.step, resumed.data_consumed) if resumed else (0, 0)
tokens = [1, 2, 3, 4, 5, 6]
batch = [tinker.Datum(model_input=tinker.ModelInput.from_ints(tokens[:-1]),
                      loss_fn_inputs={"target_tokens": tinker.TensorData(data=tokens[1:], dtype="int64", shape=[5]),
                                      "weights": tinker.TensorData(data=[1.0] * 5, dtype="float32", shape=[5])})]
while step < 4:
    client.forward_backward(batch, "cross_entropy")
    if step + 1 == 3 and not os.path.exists(ready):
        with open(ready, "w") as f:
            f.write(str(os.getpid()))
        time.sleep(600)  # killed here, mid-step
    client.optim_step(tinker.AdamParams(learning_rate=1e-3))
    step += 1
    consumed += len(batch)
    if step % 2 == 0:
        checkpoints.save(f"step-{step}", resumable=True, promotable=False, data_consumed=consumed)
service.close()
print(f"trained to step {step}, {consumed} rows consumed")
