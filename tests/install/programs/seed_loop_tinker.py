"""The seed's loop as a cookbook user writes it on fireworks-ai 1.2.24 (requests built from
Thinking Machines' tinker 0.23 types, torch for the loss), plus the two lines that record it.

Usage: python seed_loop_tinker.py INFO_JSON LEDGER_URL DEPLOYMENT_ID. Prints one JSON line:
the snapshot, the completions, and where firetitan_track was imported from.
"""

import asyncio
import json
import sys

import tinker
import torch
from fireworks.training.sdk import FiretitanServiceClient
from tinker import Datum, ModelInput, TensorData
from transformers import AutoTokenizer

import firetitan_track
from firetitan_track import track  # added

info, ledger_url, deployment_id = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]


def sft_datum(tokenizer, question, answer):
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           tokenize=True, return_dict=False)
    full = list(prompt) + list(tokenizer.encode(answer)) + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    weights = torch.zeros(len(full) - 1)
    weights[len(prompt) - 1:] = 1.0
    return Datum(model_input=ModelInput.from_ints(full[:-1]),
                 loss_fn_inputs={"target_tokens": TensorData.from_torch(torch.tensor(full[1:])),
                                 "weights": TensorData.from_torch(weights)})


def loss_fn(data, logprobs_list):
    loss = sum(-(lp * d.loss_fn_inputs["weights"].to_torch()).sum() for d, lp in zip(data, logprobs_list))
    return loss, {"nll": float(loss.detach())}


service = FiretitanServiceClient.from_firetitan_config(
    api_key="local", base_url=info["base_url"], base_model="local/tiny-qwen3", tokenizer_model=info["tokenizer_path"],
    lora_rank=0, training_shape_id="accounts/fireworks/trainingShapes/ts-local-tiny",
    deployment_id=deployment_id, learning_rate=1e-3, replica_count=1, cleanup_trainer_on_close=True,
    cleanup_deployment_on_close="scale_to_zero")
service = track(service, run_id="seed", ledger_url=ledger_url)  # added
tokenizer = AutoTokenizer.from_pretrained(info["tokenizer_path"])
training = service.create_training_client()
data = [sft_datum(tokenizer, "reverse 123", "321")]
for _ in range(3):
    training.forward_backward_custom(data, loss_fn).result()
    training.optim_step(tinker.AdamParams(learning_rate=1e-3)).result()
saved = training.save_weights_for_sampler("step-3").result()
sampler = service.create_deployment_sampler(model_path=saved.path, tokenizer=tokenizer)
messages = [{"role": "user", "content": "reverse 123"}]
completions = asyncio.run(sampler.sample_with_tokens(messages=messages, n=2, max_tokens=4, temperature=0.0))
service.log_score(sum(c.text.startswith("321") for c in completions) / 2)
service.close()
print(json.dumps({"snapshot": saved.path, "texts": [c.text for c in completions],
                  "firetitan_track": firetitan_track.__file__}))
