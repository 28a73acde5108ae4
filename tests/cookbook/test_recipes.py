"""Every recipe of the pinned cookbook, unmodified, finishes a few steps against
``firetitan-track local up``, driven through its own ``Config`` and ``main`` as
``training/examples/`` drive them, in the cookbook's own environment (fireworks-ai 1.2.24,
tinker 0.23), with tiny datasets written here.

``run_recipe`` is the one way in: it starts the recipe as a subprocess running
``recipe_driver.py`` (beside this file), so a wrapper program can run the very same
command (``prefix``, e.g. ``firetitan-track record --``). Known faults of the pinned
cookbook commit are worked around in the driver, never in the recipe (see its
``_fix_igpo_turn_advantages`` and ``_skip_checkpoint_stabilize_wait``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

import pytest

from tests.envs import COOKBOOK

DRIVER = Path(__file__).resolve().parent / "recipe_driver.py"
RECIPE_TIMEOUT_S = 600
STEPS = 2  # every dataset below holds exactly two optimizer steps of data
MANAGED_SHAPE = "accounts/fireworks/trainingShapes/{}"


@pytest.fixture(scope="session")
def cookbook_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """One service for every recipe, started as a user starts it: ``firetitan-track local up``."""
    state_dir = tmp_path_factory.mktemp("cookbook-service")
    cli = str(Path(sys.executable).with_name("firetitan-track"))
    up = subprocess.run([cli, "local", "up", "--state-dir", str(state_dir), "--log-requests"],
                        capture_output=True, text=True, timeout=120)
    assert up.returncode == 0, up.stderr
    info = json.loads(up.stdout.strip().splitlines()[-1])
    info["state_dir"] = state_dir
    yield info
    subprocess.run([cli, "local", "down", "--state-dir", str(state_dir)], capture_output=True, timeout=60)


def run_recipe(name: str, config_overrides: dict[str, Any], tmp_path: Path, service: dict, *,
               cookbook_bin: Path, prefix: Sequence[str] = ()) -> subprocess.CompletedProcess:
    """Run ``training.recipes.<name>`` with its Config built from ``config_overrides`` (over a
    log path under ``tmp_path``), against ``service`` (what ``local up`` printed), in the
    cookbook's environment. ``prefix`` goes before the command (a wrapper such as the recorder)."""
    spec = tmp_path / f"{name}.json"
    spec.write_text(json.dumps({"config": {"log_path": str(tmp_path / f"{name}-logs"), **config_overrides}}))
    env = {**os.environ, "PYTHONPATH": str(COOKBOOK), "FIREWORKS_BASE_URL": service["base_url"],
           "FIREWORKS_API_KEY": "cookbook-test-key", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "WANDB_MODE": "disabled"}
    return subprocess.run([*prefix, str(cookbook_bin / "python"), str(DRIVER), name, str(spec)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=RECIPE_TIMEOUT_S)


def _result(done: subprocess.CompletedProcess) -> dict:
    """The recipe's return value (the driver prints it last), with the metrics lines the
    recipe printed (``log_metrics_json``) under ``"printed_metrics"``."""
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return {**lines[-1]["result"], "printed_metrics": [line for line in lines if line.get("type") == "metrics"]}


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def _chat(i: int) -> list[dict]:
    return [{"role": "user", "content": f"reverse {i}{i + 1}{i + 2}"}]


def _tokenizer(service: dict) -> dict:
    """How every recipe names its tokenizer: the directory `local up` printed, and the renderer."""
    return {"tokenizer_model": service["tokenizer_path"], "renderer_name": "qwen3_instruct"}


@pytest.fixture
def recipe(cookbook_service: dict, cookbook_bin: Path, tmp_path: Path):
    def run(name: str, config: dict[str, Any]) -> dict:
        return _result(run_recipe(name, config, tmp_path, cookbook_service, cookbook_bin=cookbook_bin))
    return run


def test_sft_loop_on_the_qwen3p5_lora_shape(recipe, cookbook_service, tmp_path):
    rows = [{"messages": _chat(i) + [{"role": "assistant", "content": f"{i + 2}{i + 1}{i}"}]} for i in range(4)]
    result = recipe("sft_loop", {
        **_tokenizer(cookbook_service), "dataset": _write_jsonl(tmp_path / "sft.jsonl", rows),
        "base_model": "accounts/fireworks/models/qwen3p5-9b", "lora_rank": 8, "epochs": 1, "batch_size": 2,
        "learning_rate": 1e-3, "render_workers": 1,
        "trainer": {"training_shape_id": MANAGED_SHAPE.format("qwen3p5-9b-65k-lora")}})
    assert result["steps"] == STEPS


def _preference_rows(tmp_path: Path) -> str:
    rows = [{"chosen": {"messages": _chat(i) + [{"role": "assistant", "content": f"{i + 2}{i + 1}{i}"}]},
             "rejected": {"messages": _chat(i) + [{"role": "assistant", "content": f"{i}{i + 1}{i + 2}"}]}}
            for i in range(4)]
    return _write_jsonl(tmp_path / "pairs.jsonl", rows)


def test_dpo_loop(recipe, cookbook_service, tmp_path):
    result = recipe("dpo_loop", {
        **_tokenizer(cookbook_service), "dataset": _preference_rows(tmp_path), "epochs": 1, "batch_size": 2,
        "learning_rate": 1e-3, "render_workers": 1,
        "trainer": {"training_shape_id": MANAGED_SHAPE.format("qwen3-8b-128k-h200")}})
    assert result["steps"] == STEPS


def test_orpo_loop_on_the_qwen3p6_moe_lora_shape(recipe, cookbook_service, tmp_path):
    result = recipe("orpo_loop", {
        **_tokenizer(cookbook_service), "dataset": _preference_rows(tmp_path), "epochs": 1, "batch_size": 2,
        "base_model": "accounts/fireworks/models/qwen3p6-35b-a3b", "lora_rank": 8, "learning_rate": 1e-3,
        "trainer": {"training_shape_id": MANAGED_SHAPE.format("qwen3p6-35b-a3b-256k-lora")}})
    assert result["steps"] == STEPS


def _rl_rows(tmp_path: Path) -> str:
    rows = [{"messages": _chat(i), "ground_truth": f"<answer>{i + 2}{i + 1}{i}</answer>"} for i in range(STEPS)]
    return _write_jsonl(tmp_path / "prompts.jsonl", rows)


def _rl_config(cookbook_service: dict, dataset: str) -> dict:
    return {"dataset": dataset, "max_rows": STEPS, "completions_per_prompt": 4, "max_completion_tokens": 12,
            "learning_rate": 1e-3, "trainer": {"training_shape_id": MANAGED_SHAPE.format("qwen3-8b-128k-h200")},
            "deployment": {"tokenizer_model": cookbook_service["tokenizer_path"]}}


def test_rl_loop(recipe, cookbook_service, tmp_path):
    result = recipe("rl_loop", {**_rl_config(cookbook_service, _rl_rows(tmp_path)), "renderer_name": "qwen3_instruct"})
    assert result["steps"] == STEPS and result["reference_job_id"]  # GRPO with its KL reference


def test_igpo_loop(recipe, cookbook_service, tmp_path):
    result = recipe("igpo_loop", _rl_config(cookbook_service, _rl_rows(tmp_path)))
    assert result["steps"] == STEPS


def test_async_rl_loop(recipe, cookbook_service, tmp_path):
    # Token-in rows, as examples/rl/single_turn_token_in takes them (its rollout reads the reward).
    rows = [{"id": f"row-{i}", "prompt_token_ids": list(f"reverse {i}{i + 1}{i + 2}\n".encode()),
             "reward": float(i % 2)} for i in range(STEPS)]
    config = _rl_config(cookbook_service, _write_jsonl(tmp_path / "tokens.jsonl", rows))
    result = recipe("async_rl_loop", {**config, "completions_per_prompt": 2})
    assert result["steps"] == STEPS


def test_distillation_loop_scores_with_the_teacher_through_echo(recipe, cookbook_service, tmp_path):
    rows = [{"messages": _chat(i)} for i in range(STEPS)]
    result = recipe("distillation_loop", {
        "dataset": _write_jsonl(tmp_path / "prompts.jsonl", rows), "max_rows": STEPS,
        "teacher_model": "accounts/fireworks/models/qwen3-0p6b", "completions_per_prompt": 2,
        "max_completion_tokens": 12, "learning_rate": 1e-3,
        # the recipe's own __main__ shape: the seed's
        "trainer": {"training_shape_id": MANAGED_SHAPE.format("qwen3-8b-128k-h200")},
        "deployment": {"tokenizer_model": cookbook_service["tokenizer_path"]}})
    # A step trains only on rollouts the teacher scored (a failed scoring drops the group).
    assert result["steps"] == STEPS
    assert [m["step"] for m in result["printed_metrics"] if "opd_sampled_reverse_kl" in m] == [1, 2]
