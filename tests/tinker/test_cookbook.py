"""tinker-cookbook (from the registry, in its own environment) runs its recipes unmodified against
``local up``, offline, configured only by what `local env` exports: the supervised recipe on a
JSONL conversation file through its own file dataset builder, and the RL recipe on its
arithmetic environment (which needs no download), a few steps each."""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import tinker

from tests.tinker.conftest import TINKER_NAME


def run_recipe(bin: Path, module: str, args: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    run = subprocess.run([str(bin / "python"), "-m", module, *args], env=env, cwd=cwd, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    return run


def metrics(log_path: Path) -> list[dict]:
    return [json.loads(line) for line in (log_path / "metrics.jsonl").read_text().splitlines() if line.strip()]


def checkpoints(log_path: Path) -> list[dict]:
    return [json.loads(line) for line in (log_path / "checkpoints.jsonl").read_text().splitlines() if line.strip()]


def assert_served(local_info, saved: list[dict]) -> None:
    """Every state and sampler path the recipe recorded is one the service holds."""
    rest = tinker.RestClient(base_url=local_info.base_url, api_key="tml-local")
    for record in saved:
        run = rest.get_training_run_by_tinker_path(record["state_path"]).result()
        assert run.base_model == TINKER_NAME and run.is_lora
        held = {c.tinker_path for c in rest.list_checkpoints(run.training_run_id).result().checkpoints}
        assert {record["state_path"], record["sampler_path"]} <= held


def test_supervised_recipe_on_a_conversation_file(tinker_cookbook_bin, tinker_env, local_info, tmp_path):
    rng = random.Random(0)
    data = tmp_path / "conversations.jsonl"
    with data.open("w") as f:
        for _ in range(12):
            a, b = rng.randint(0, 50), rng.randint(0, 50)
            f.write(json.dumps({"messages": [{"role": "user", "content": f"{a}+{b}?"},
                                             {"role": "assistant", "content": str(a + b)}]}) + "\n")
    log_path = tmp_path / "sl"
    run_recipe(tinker_cookbook_bin, "tinker_cookbook.recipes.chat_sl.train", [
        f"model_name={TINKER_NAME}", f"dataset={data}", "lora_rank=8", "batch_size=4", "max_length=128",
        "learning_rate=1e-3", "max_steps=3", "save_every=2", "eval_every=0", f"log_path={log_path}",
        "behavior_if_log_dir_exists=delete"], tinker_env, tmp_path)
    steps = [m for m in metrics(log_path) if "train_mean_nll" in m]
    assert len(steps) == 3 and all(m["num_sequences"] == 4 for m in steps)
    saved = checkpoints(log_path)
    assert [c["name"] for c in saved] == ["000002", "final"]
    assert_served(local_info, saved)


def test_rl_recipe_on_the_arithmetic_environment(tinker_cookbook_bin, tinker_env, local_info, tmp_path):
    log_path = tmp_path / "rl"
    run_recipe(tinker_cookbook_bin, "tinker_cookbook.recipes.math_rl.train", [
        f"model_name={TINKER_NAME}", "env=arithmetic", "lora_rank=8", "group_size=4", "groups_per_batch=4",
        "max_tokens=5", "max_steps=3", "save_every=2", "eval_every=2", f"log_path={log_path}",
        "behavior_if_log_dir_exists=delete"], tinker_env, tmp_path)
    steps = metrics(log_path)
    assert len([m for m in steps if "optim/entropy" in m]) == 3
    # The recipe compares the sampler's logprobs with the trainer's own: on one engine they agree.
    assert all(abs(m["optim/kl_sample_train_v1"]) < 1e-3 for m in steps if "optim/kl_sample_train_v1" in m)
    saved = checkpoints(log_path)
    assert saved and saved[-1]["name"] == "final"
    assert_served(local_info, saved)
