"""A researcher's loop on their own SDK (fireworks-ai 1.2.30, native types), recorded by adding
track(): run in an environment holding that SDK, transformers for the tokenizer, and the core of
firetitan-track, with no torch (the built-in cross-entropy loss is computed by the service).

Usage: python tracked_loop.py INFO_JSON DEPLOYMENT_ID  (the ledger: the default one, under the
current directory). Prints one JSON line: the snapshot, whether torch was loaded, and where
firetitan_track and the SDK were imported from.
"""

import asyncio
import json
import sys

import fireworks
from fireworks.training.sdk import AdamParams, Datum, FiretitanServiceClient, ModelInput, TensorData
from transformers import AutoTokenizer

import firetitan_track
from firetitan_track import track

info, deployment_id = json.loads(sys.argv[1]), sys.argv[2]
service = FiretitanServiceClient.from_firetitan_config(
    api_key="local", base_url=info["base_url"], base_model="local/tiny-qwen3", tokenizer_model=info["tokenizer_path"],
    lora_rank=0, training_shape_id="accounts/fireworks/trainingShapes/ts-local-tiny",
    deployment_id=deployment_id, learning_rate=1e-3, replica_count=1, cleanup_trainer_on_close=True,
    cleanup_deployment_on_close="scale_to_zero")
service = track(service, run_id="mine")  # the added line (with the import)
tokenizer = AutoTokenizer.from_pretrained(info["tokenizer_path"])
training = service.create_training_client()

prompt = tokenizer.apply_chat_template([{"role": "user", "content": "reverse 123"}], add_generation_prompt=True,
                                       tokenize=True, return_dict=False)
full = list(prompt) + tokenizer.encode("321")
weights = [0.0] * (len(prompt) - 1) + [1.0] * (len(full) - len(prompt))
datum = Datum(model_input=ModelInput.from_ints(full[:-1]),
              loss_fn_inputs={"target_tokens": TensorData(data=full[1:], dtype="int64", shape=[len(full) - 1]),
                              "weights": TensorData(data=weights, dtype="float32", shape=[len(weights)])})
for _ in range(2):
    training.forward_backward([datum], "cross_entropy").result()
    training.optim_step(AdamParams(learning_rate=1e-3)).result()
saved = training.save_weights_for_sampler("step-2").result()
sampler = service.create_deployment_sampler(model_path=saved.path, tokenizer=tokenizer)
messages = [{"role": "user", "content": "reverse 123"}]
completions = asyncio.run(sampler.sample_with_tokens(messages=messages, n=2, max_tokens=4, temperature=0.0))
service.log_score(sum(c.text.startswith("321") for c in completions) / 2)
service.close()
print(json.dumps({"snapshot": saved.path, "torch_loaded": "torch" in sys.modules,
                  "firetitan_track": firetitan_track.__file__, "fireworks": fireworks.__file__, "sys_path": sys.path}))
