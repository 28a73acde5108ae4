"""The seed's research loop, as a researcher writes it: nothing of firetitan-track in it
(with ``--autolog RUN_ID``, the one line ``firetitan_track.autolog`` adds).

It provisions a trainer and a deployment, then for each step: saves sampler weights,
syncs them, samples completions from the deployment and trains on them (the datums are
built from the sampled sequences, as the cookbook builds them), then saves DCP state,
promotes the last snapshot and cleans up. Prints ``done <state path>`` on stdout and a line on stderr, for the tests to
see that both reach the terminal unchanged.

    python seed_loop.py BASE_URL TOKENIZER SHAPE DEPLOYMENT_ID [--autolog RUN_ID] [--fail]
"""

import asyncio
import sys

base_url, tokenizer_path, shape, deployment_id = sys.argv[1:5]
if "--autolog" in sys.argv:
    import firetitan_track

    firetitan_track.autolog(run_id=sys.argv[sys.argv.index("--autolog") + 1])

try:
    from fireworks.training import tinker  # 1.2.30: the SDK's own types
except ImportError:
    import tinker  # 1.2.24 takes tinker 0.23's
from fireworks.training.sdk import FiretitanServiceClient
from transformers import AutoTokenizer

service = FiretitanServiceClient.from_firetitan_config(
    api_key="local", base_url=base_url, base_model="accounts/fireworks/models/qwen3-8b",
    tokenizer_model=tokenizer_path, lora_rank=0, training_shape_id=shape, deployment_id=deployment_id,
    learning_rate=1e-3, replica_count=1, gradient_accumulation_steps=None, cleanup_trainer_on_close=True,
    cleanup_deployment_on_close="scale_to_zero")
tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
training = service.create_training_client()


def datum(tokens):
    n = len(tokens) - 1
    return tinker.Datum(model_input=tinker.ModelInput.from_ints(tokens[:-1]),
                        loss_fn_inputs={"target_tokens": tinker.TensorData(data=tokens[1:], dtype="int64", shape=[n]),
                                        "weights": tinker.TensorData(data=[1.0] * n, dtype="float32", shape=[n])})


def loss_fn(data, logprobs_list):
    loss = sum(-(lp * d.loss_fn_inputs["weights"].to_torch()).sum() for d, lp in zip(data, logprobs_list))
    return loss, {"nll": float(loss.detach())}


messages = [{"role": "user", "content": "What is 2+2?"}]
for step in range(2):
    saved = training.save_weights_for_sampler(f"step_{step:05d}").result()
    sampler = service.create_deployment_sampler(model_path=saved.path, tokenizer=tokenizer)
    completions = asyncio.run(sampler.sample_with_tokens(messages=messages, n=2, max_tokens=8))
    training.forward_backward_custom([datum(list(c.full_tokens)) for c in completions], loss_fn).result()
    training.optim_step(tinker.AdamParams(learning_rate=1e-3)).result()
state = training.save_state("final").result()
training.list_checkpoints()  # a call the recorder does not know: passed through
rows = {row["name"].rsplit("/", 1)[-1]: row for row in service.list_checkpoints(service.trainer_job_id)}
service.promote_checkpoint(name=rows[saved.path]["name"], output_model_id=f"{deployment_id}-promoted",
                           base_model="accounts/fireworks/models/qwen3-8b")
service.close()
print(f"done {state.path}")
print("seed loop: stderr stays the program's", file=sys.stderr)
if "--fail" in sys.argv:
    raise RuntimeError("the program's own failure, after its loop")
