"""Run one of the pinned cookbook's recipes, unmodified, on a tiny configuration against the
local service (the recipes' own ``main(cfg)``, as the cookbook's examples call it).

    python cookbook_recipe.py sft_loop|rl_loop|async_rl_loop BASE_URL TOKENIZER SHAPE FOLDER

Data is written into FOLDER. The RL recipes get a reward with variance on an untrained model
(the completion's length, odd or even), since a GRPO group of equal rewards trains nothing:
``rl_loop`` through its module's ``reward_fn`` (its "customize this" hook), ``async_rl_loop``
through the rollout function its ``main`` takes.
"""

import json
import os
import sys
import uuid

recipe, base_url, tokenizer_path, shape, folder = sys.argv[1:6]
base_model = "accounts/fireworks/models/qwen3-8b"
os.environ["FIREWORKS_BASE_URL"] = base_url
from training.utils.config import DeployConfig, TrainerConfig, WandBConfig  # noqa: E402

trainer = TrainerConfig(training_shape_id=shape)
deployment = DeployConfig(deployment_id=f"{recipe.replace('_', '-')}-{uuid.uuid4().hex[:6]}",
                          tokenizer_model=tokenizer_path)
prompts = [f"reverse {n}" for n in (123, 456, 789, 12, 34, 56)]

if recipe == "sft_loop":
    from training.recipes.sft_loop import Config, main

    data = os.path.join(folder, "sft.jsonl")
    with open(data, "w") as f:
        for p in prompts[:4]:
            f.write(json.dumps({"messages": [{"role": "user", "content": p},
                                             {"role": "assistant", "content": p.split()[1][::-1]}]}) + "\n")
    # W&B on (offline, no account): the recipe logs its eval metrics there
    print(main(Config(log_path=os.path.join(folder, "logs"), base_model=base_model, dataset=data,
                      evaluation_dataset=data, tokenizer_model=tokenizer_path, renderer_name="qwen3_instruct",
                      epochs=2, batch_size=2, max_seq_len=256, render_workers=1, trainer=trainer,
                      wandb=WandBConfig(entity="local", project="recorded-sft"))))
elif recipe == "rl_loop":
    import training.recipes.rl_loop as rl

    rl.reward_fn = lambda completion, row: float(len(completion) % 2)
    rows = [{"messages": [{"role": "user", "content": p}]} for p in prompts[:4]]
    print(rl.main(rl.Config(log_path=os.path.join(folder, "logs"), base_model=base_model, completions_per_prompt=4,
                            max_completion_tokens=8, max_rows=4, renderer_name="qwen3_instruct", kl_beta=0.0,
                            router_replay=False, trainer=trainer, deployment=deployment,
                            wandb=WandBConfig(entity=None), save_final_checkpoint=False), rows=rows))
elif recipe == "async_rl_loop":
    from training.examples.rl.vanilla_sampler import build_deployment_sampler
    from training.recipes.async_rl_loop import Config, main
    from training.utils.rl.rollout import RolloutRun, RolloutSample

    def make_rollout_fn(setup):
        sampler = build_deployment_sampler(setup)

        async def rollout_fn(row):
            prompt = setup.tokenizer.apply_chat_template(row["messages"], tokenize=True, add_generation_prompt=True,
                                                         return_dict=False)
            out = await sampler.sample_with_prompt_tokens(list(prompt), n=1, **setup.sample_kwargs)
            if not out:
                return None
            c = out[0]
            p, tokens = int(c.prompt_len), list(c.full_tokens)
            completion = tokens[p:]
            logprobs = list(c.sampling_logprobs or [])[-len(completion):] if completion else []
            if not completion or len(logprobs) != len(completion) or any(v is None for v in logprobs):
                return None
            return RolloutRun(segments=[RolloutSample(
                tokens=tokens, logprobs=[0.0] * p + [float(v) for v in logprobs],
                loss_mask=[0] * p + [1] * len(completion), reward=float(len(completion) % 2),
                finish_reason=c.finish_reason, text=c.text)])
        return rollout_fn

    async def evaluation_fn(step, rollout_fn):
        runs = [await rollout_fn({"messages": [{"role": "user", "content": "reverse 42"}]}) for _ in range(2)]
        return {"eval/reward": sum(r.segments[0].reward for r in runs if r) / 2}

    rows = [{"id": str(i), "messages": [{"role": "user", "content": p}]} for i, p in enumerate(prompts)]
    print(main(Config(log_path=os.path.join(folder, "logs"), base_model=base_model, completions_per_prompt=4,
                      max_completion_tokens=6, max_rows=6, kl_beta=0.0, router_replay=False,
                      max_head_offpolicy_versions=1, trainer=trainer, deployment=deployment,
                      wandb=WandBConfig(entity=None), save_final_checkpoint=False),
               rollout_fn_factory=make_rollout_fn, rows=rows, evaluation_fn=evaluation_fn))
else:
    raise SystemExit(f"no driver for {recipe}")
