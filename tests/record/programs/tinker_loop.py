"""A loop on Thinking Machines' ``tinker`` client (0.38) with the two lines ``track()`` asks for.

    python tinker_loop.py BASE_URL LEDGER_URL RUN_ID

Each step samples from the current weights, trains on those samples (next-token layout), and
publishes new weights for the next step's sampler; step 2 saves a state and a named sampler
snapshot, the others publish through ``save_weights_and_get_sampling_client``.
"""

import sys

import tinker
from tinker import types

from firetitan_track import track  # added

base_url, ledger_url, run_id = sys.argv[1:4]
service = tinker.ServiceClient(base_url=base_url, api_key="tml-local")
service = track(service, run_id=run_id, ledger_url=ledger_url)  # added
trainer = service.create_lora_training_client(base_model="Qwen/Qwen3-8B", rank=8).result()
prompt = [1, 2, 3, 4]
params = types.SamplingParams(max_tokens=4, temperature=1.0)
sampler = trainer.save_weights_and_get_sampling_client().result()
for step in range(1, 4):
    out = sampler.sample(types.ModelInput.from_ints(prompt), 2, params).result()
    data = []
    for seq in out.sequences:
        tokens = prompt + list(seq.tokens)
        data.append(types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                                loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)}))
    trainer.forward_backward(data, "cross_entropy").result()
    trainer.optim_step(types.AdamParams(learning_rate=1e-3)).result()
    if step == 2:
        trainer.save_state("state-2").result()
        saved = trainer.save_weights_for_sampler("sampler-2").result()
        sampler = service.create_sampling_client(model_path=saved.path).result()
    else:
        sampler = trainer.save_weights_and_get_sampling_client().result()
print("trained", step)
