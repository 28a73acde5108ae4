"""tinker-cookbook (from the registry, in its own environment) runs its recipes unmodified against
``local up``, offline, configured only by what `local env` exports, under ``firetitan-track
record``: the supervised recipe on a JSONL conversation file through its own file dataset
builder, and the RL recipe on its arithmetic environment (which needs no download; with a held-out
evaluator of the cookbook's own, math_rl_with_eval.py, since that environment has no test split),
a few steps each. Each run also proves what the record of a tinker program holds (issue 25): the trainer,
every step, state and sampler snapshot the recipe saved (as its own ``checkpoints.jsonl`` names
them), the samples each step trained on, and its evals tied in ``audit`` to the snapshot they
measured."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import tinker

from firetitan_track import Ledger
from firetitan_track.projections.audit import audit
from firetitan_track.projections.run_state import fold
from tests.tinker.conftest import TINKER_NAME

CLI = Path(sys.executable).with_name("firetitan-track")


def run_recorded(bin: Path, run_id: str, program: list[str], env: dict, cwd: Path) -> Ledger:
    """``firetitan-track record --run-id RUN -- python PROGRAM...`` in tinker-cookbook's
    environment; the ledger it wrote, verified, the run completed."""
    ledger_url = f"sqlite:///{cwd / 'ledger.db'}"
    run = subprocess.run([str(CLI), "--ledger", ledger_url, "record", "--run-id", run_id, "--", str(bin / "python"),
                          *program], env=env, cwd=cwd, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    verify = subprocess.run([str(CLI), "--ledger", ledger_url, "verify", run_id], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    ledger = Ledger.open(ledger_url)
    events = ledger.read(run_id)
    assert fold(events).status == "completed"
    assert not [ev.data for ev in events if ev.type == "RecordingDegraded"]
    return ledger


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


def assert_recorded_checkpoints(ledger: Ledger, run_id: str, saved: list[dict]) -> list:
    """The ledger holds the recipe's trainer, its steps from 1, and every checkpoint its
    ``checkpoints.jsonl`` lists (state with the loop state as data cursor, sampler snapshot);
    ``audit`` lists every snapshot. Returns the run's events."""
    events = ledger.read(run_id)
    of = lambda type: [ev.data for ev in events if ev.type == type]  # noqa: E731
    [trainer] = of("TrainerProvisioned")
    assert (trainer["base_model"], trainer["lora_rank"]) == (TINKER_NAME, 8)
    assert all(s["trainer_job_id"] == trainer["trainer_job_id"] for s in of("StepCompleted"))
    assert [s["step"] for s in of("StepCompleted")] == list(range(1, len(of("StepCompleted")) + 1))
    states = {s["path"]: s for s in of("StateSaved")}
    for record in saved:
        cursor = {k: v for k, v in record.items() if k not in ("name", "state_path", "sampler_path")}
        assert states[record["state_path"]]["data_cursor"] == cursor
    snapshots = {s["path"] for s in of("SnapshotSaved")}
    assert {r["sampler_path"] for r in saved} <= snapshots
    assert {r.snapshot_path for r in audit(ledger, run_id)} == snapshots
    return events


def test_supervised_recipe_on_a_conversation_file(tinker_cookbook_recorder_bin, tinker_env, local_info, tmp_path):
    rng = random.Random(0)
    data = tmp_path / "conversations.jsonl"
    with data.open("w") as f:
        for _ in range(12):
            a, b = rng.randint(0, 50), rng.randint(0, 50)
            f.write(json.dumps({"messages": [{"role": "user", "content": f"{a}+{b}?"},
                                             {"role": "assistant", "content": str(a + b)}]}) + "\n")
    log_path = tmp_path / "sl"
    ledger = run_recorded(tinker_cookbook_recorder_bin, "chat-sl", ["-m", "tinker_cookbook.recipes.chat_sl.train",
        f"model_name={TINKER_NAME}", f"dataset={data}", "lora_rank=8", "batch_size=4", "max_length=128",
        "learning_rate=1e-3", "max_steps=3", "save_every=2", "eval_every=0", f"log_path={log_path}",
        "behavior_if_log_dir_exists=delete"], tinker_env, tmp_path)
    steps = [m for m in metrics(log_path) if "train_mean_nll" in m]
    assert len(steps) == 3 and all(m["num_sequences"] == 4 for m in steps)
    saved = checkpoints(log_path)
    assert [c["name"] for c in saved] == ["000002", "final"]
    assert_served(local_info, saved)
    events = assert_recorded_checkpoints(ledger, "chat-sl", saved)
    recorded = [ev.data for ev in events if ev.type == "StepCompleted"]
    assert [s["provenance"] for s in recorded] == [{"datums": 4, "matched": 0}] * 3  # a dataset's, not sampled
    # the recipe's own metrics, recorded from its logger, once each
    logged = [ev.data for ev in events if ev.type == "MetricsLogged" and "train_mean_nll" in ev.data["metrics"]]
    assert [m["metrics"]["train_mean_nll"] for m in logged] == [m["train_mean_nll"] for m in steps]


def test_rl_recipe_on_the_arithmetic_environment(tinker_cookbook_recorder_bin, tinker_env, local_info, tmp_path):
    log_path = tmp_path / "rl"
    # math_rl's own command line, with a held-out evaluator (the arithmetic environment has no test split)
    ledger = run_recorded(tinker_cookbook_recorder_bin, "math-rl", [str(Path(__file__).parent / "math_rl_with_eval.py"),
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
    events = assert_recorded_checkpoints(ledger, "math-rl", saved)
    # on-policy: each step trained on samples drawn from the weights published just before it
    recorded = [ev.data for ev in events if ev.type == "StepCompleted"]
    assert len(recorded) == 3
    assert all(s["provenance"]["matched"] == s["provenance"]["datums"] > 0 for s in recorded)
    assert all(s["version_offsets"]["max"] == 0 for s in recorded)
    # its evals (every second iteration) measured the sampler of that iteration: an ephemeral
    # snapshot at 0, the saved checkpoint 000002 at 2
    snapshots = [ev.data for ev in events if ev.type == "SnapshotSaved"]
    evals = [r for r in audit(ledger, "math-rl") if r.source == "program"]
    by_step = {r.step: r for r in evals}
    assert sorted(by_step) == [0, 2] and all(r.measured_on == "deployment" for r in evals)
    assert by_step[0].snapshot_path == snapshots[0]["path"] and snapshots[0]["name"] == "ephemeral"
    assert by_step[2].snapshot_path == next(c["sampler_path"] for c in saved if c["name"] == "000002")
    assert all(any(k.startswith("test/") for k in r.metrics) for r in evals)
