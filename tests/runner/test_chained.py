"""Chained runs: model.init_from starts a run from another run's saved state. The record
names the upstream (RunStarted, lineage, audit), and an upstream that is missing,
unfinished or of another model is refused before anything is written."""

from __future__ import annotations

import re
import signal

import pytest
from click.testing import CliRunner

from firetitan_track import Ledger
from firetitan_track.projections.audit import eval_rows
from firetitan_track.projections.lineage import lineage
from runner.chain import ChainError, resolve_upstream
from runner.cli import main
from runner.loop import run_spec
from runner.spec import load_spec
from tests.helpers import cli, small_spec


@pytest.fixture(scope="module")
def upstream(local_url, tmp_path_factory):
    """A finished 4-step SFT run (states at 0, 2, 4) in its own ledger."""
    tmp = tmp_path_factory.mktemp("chain")
    url = f"sqlite:///{tmp}/ledger.db"
    result = run_spec(load_spec(small_spec(tmp, local_url, name="up")), ledger_url=url, run_id="up", progress=False)
    assert result.status == "completed"
    return url, tmp


def test_a_chained_run_starts_from_its_upstream_state_and_its_record_names_it(upstream, local_url):
    url, tmp = upstream
    spec = load_spec(small_spec(tmp, local_url, name="down", model={"init_from": "up"},
                                recipe={"kind": "dpo", "batch_size": 4}))
    assert run_spec(spec, ledger_url=url, run_id="down", progress=False).status == "completed"
    led = Ledger.open(url)
    up_events, down_events = led.read("up"), led.read("down")
    last_state = [ev.data for ev in up_events if ev.type == "StateSaved"][-1]
    started = down_events[0].data["init_from"]
    assert started == {"run_id": "up", "status": "completed", "state_path": last_state["path"],
                       "state_name": last_state["name"], "step": 4, "trainer_job_id": last_state["trainer_job_id"]}
    # the chained run's baseline eval scores the upstream's final weights on the same prompts
    up_last, down_first = eval_rows(up_events)[-1], eval_rows(down_events)[0]
    assert down_first.step == 0 and down_first.prompt_set_digest == up_last.prompt_set_digest
    assert down_first.score == up_last.score
    # DPO's separate reference starts where the policy does (the upstream's weights): no margin at step 1
    first = next(ev.data["metrics"] for ev in down_events if ev.type == "StepCompleted")
    assert abs(first["margin"]) < 1e-4 and first["loss"] == pytest.approx(0.6931, abs=1e-3)

    snapshot = down_first.snapshot_path
    assert lineage(led, snapshot).upstream == started
    out = CliRunner().invoke(main, ["--ledger", url, "lineage", snapshot, "--json"])
    assert '"run_id": "up"' in out.output
    audit = CliRunner().invoke(main, ["--ledger", url, "audit", "down"])
    assert audit.exit_code == 0 and f"started from run up at step 4 (state {last_state['path']})" in audit.output

    at_two = spec.with_overrides({"model.init_from": "up@2"})
    assert resolve_upstream(led, at_two.model, at_two.bad)["step"] == 2


def test_an_unusable_upstream_is_refused_naming_both_before_anything_is_written(upstream, local_url):
    url, tmp = upstream
    crashed = cli(url, "run", str(small_spec(tmp, local_url, name="half")), "--run-id", "half", "--quiet",
                  crash_at="event:RunStarted:1")
    assert crashed.returncode == -signal.SIGKILL
    cases = [
        ({"model": {"init_from": "nope"}}, "no run 'nope'"),
        ({"model": {"init_from": "half"}}, "run half is running at step 0, not finished"),
        ({"model": {"init_from": "up@3"}}, "run up saved no state at step 3 (its states: steps 0, 2, 4)"),
        ({"model": {"init_from": "up", "lora_rank": 8, "training_shape": "ts-local-tiny-lora"}},
         "this run's model.lora_rank is 8 but run up's is 0"),
        ({"model": {"init_from": "up", "base_model": "accounts/fireworks/models/qwen3-0p6b",
                    "training_shape": "ts-qwen3-0p6b-lora"}},
         "this run's model.base_model is 'accounts/fireworks/models/qwen3-0p6b' but run up's is 'local/tiny-qwen3'"),
    ]
    for i, (sections, why) in enumerate(cases):
        path = small_spec(tmp, local_url, name=f"bad{i}", **sections)
        with pytest.raises(ChainError, match=re.escape(f"{path}: model.init_from = ") + ".*" + re.escape(why)):
            run_spec(load_spec(path), ledger_url=url, run_id=f"bad{i}", progress=False)
        assert Ledger.open(url).stream_version(f"bad{i}") == 0
    proc = cli(url, "run", str(small_spec(tmp, local_url, name="bad0", model={"init_from": "nope"})),
               "--run-id", "bad-cli", "--quiet")
    assert proc.returncode == 1 and "no run 'nope'" in proc.stderr


def test_spec_keys_for_chains_and_preferences_are_checked_where_they_are_written(tmp_path):
    from runner.spec import Spec, SpecError

    for raw, why in [({"model": {"init_from": "up@two"}}, "model.init_from: expected \"RUN_ID\" or \"RUN_ID@STEP\""),
                     ({"model": {"init_from": "@4"}}, "model.init_from: expected"),
                     ({"recipe": {"kind": "dpo", "beta": 0.0}}, "recipe.beta: must be positive"),
                     ({"recipe": {"kind": "ppo"}}, "recipe.kind: must be one of 'sft', 'grpo', 'dpo', 'orpo'")]:
        with pytest.raises(SpecError, match=re.escape(f"x.toml: {why}")):
            Spec.from_dict(raw, source="x.toml")
