"""A program whose rollouts are drawn in other processes: a ``multiprocessing`` spawn worker
and a ``subprocess``, each sampling one sequence from the deployment the program synced. The
program trains one step on those sequences and two of its own.

    python workers.py BASE_URL TOKENIZER SHAPE DEPLOYMENT_ID [--autolog RUN_ID]
    python workers.py --draw INFERENCE_URL MODEL TOKENIZER     (the subprocess: prints the tokens)
"""

import asyncio
import json
import multiprocessing
import os
import subprocess
import sys

try:
    from fireworks.training import tinker  # 1.2.30: the SDK's own types
except ImportError:
    import tinker  # 1.2.24 takes tinker 0.23's


def draw(inference_url: str, model: str, tokenizer_path: str) -> list[int]:
    """One sampled sequence (prompt + completion) from the deployment serving ``model``."""
    from fireworks.training.sdk.sampling import DeploymentSampler
    from transformers import AutoTokenizer

    sampler = DeploymentSampler(inference_url=inference_url, model=model, api_key=os.environ["FIREWORKS_API_KEY"],
                                tokenizer=AutoTokenizer.from_pretrained(tokenizer_path))
    out = asyncio.run(sampler.sample_with_tokens(messages=[{"role": "user", "content": "Count to three."}], n=1,
                                                 max_tokens=8))
    return list(out[0].full_tokens)


def datum(tokens):
    n = len(tokens) - 1
    return tinker.Datum(model_input=tinker.ModelInput.from_ints(tokens[:-1]),
                        loss_fn_inputs={"target_tokens": tinker.TensorData(data=tokens[1:], dtype="int64", shape=[n]),
                                        "weights": tinker.TensorData(data=[1.0] * n, dtype="float32", shape=[n])})


def main() -> None:
    base_url, tokenizer_path, shape, deployment_id = sys.argv[1:5]
    if "--autolog" in sys.argv:
        import firetitan_track

        firetitan_track.autolog(run_id=sys.argv[sys.argv.index("--autolog") + 1])
    from fireworks.training.sdk import FiretitanServiceClient
    from transformers import AutoTokenizer

    service = FiretitanServiceClient.from_firetitan_config(
        api_key=os.environ["FIREWORKS_API_KEY"], base_url=base_url, base_model="accounts/fireworks/models/qwen3-8b",
        tokenizer_model=tokenizer_path, lora_rank=0, training_shape_id=shape, deployment_id=deployment_id,
        learning_rate=1e-3, replica_count=1, gradient_accumulation_steps=None, cleanup_trainer_on_close=True,
        cleanup_deployment_on_close="scale_to_zero")
    training = service.create_training_client()
    saved = training.save_weights_for_sampler("rollout-policy").result()
    sampler = service.create_deployment_sampler(model_path=saved.path,
                                                tokenizer=AutoTokenizer.from_pretrained(tokenizer_path))
    own = asyncio.run(sampler.sample_with_tokens(messages=[{"role": "user", "content": "Hi"}], n=2, max_tokens=8))
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        spawned = pool.apply(draw, (sampler.base_url, sampler.model, tokenizer_path))
    child = subprocess.run([sys.executable, __file__, "--draw", sampler.base_url, sampler.model, tokenizer_path],
                           capture_output=True, text=True, check=True)
    sequences = [list(c.full_tokens) for c in own] + [spawned, json.loads(child.stdout.strip().splitlines()[-1])]
    training.forward_backward([datum(tokens) for tokens in sequences], "cross_entropy").result()
    training.optim_step(tinker.AdamParams(learning_rate=1e-3)).result()
    service.close()
    print(f"trained on {len(sequences)} sequences")


if __name__ == "__main__":
    if sys.argv[1] == "--draw":
        print(json.dumps(draw(*sys.argv[2:5])))
    else:
        main()
