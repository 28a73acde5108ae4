"""DPO and ORPO through the runner: preference pairs, the metrics they record, DPO's frozen
reference (its cached log-probabilities rebuilt to the same values after a SIGKILL), and
the crashed attempt's reference trainer retired on resume."""

from __future__ import annotations

import json
import signal

import pytest
from click.testing import CliRunner

from firetitan_track import Ledger
from firetitan_track.projections.run_state import authoritative, fold
from runner.cli import main
from runner.loop import resume_run, run_spec
from runner.spec import load_spec
from runner.tasks import DataError, TASKS, _rng
from runner.tasks.preference import Pair, load_pairs, pair_batch
from tests.helpers import cli, completed_run, small_spec, trainer_state

DPO = {"recipe": {"kind": "dpo", "batch_size": 4, "beta": 0.1}}


def steps_of(ledger_url: str, run_id: str) -> dict[int, dict[str, float]]:
    events = authoritative(Ledger.open(ledger_url).read(run_id))
    return {ev.data["step"]: {k: round(v, 6) for k, v in ev.data["metrics"].items()}
            for ev in events if ev.type == "StepCompleted"}


# -- preference data ---------------------------------------------------------------------------


def test_builtin_pairs_are_a_pure_function_of_seed_and_step_with_a_plausible_wrong_answer():
    pairs, cursor = pair_batch("reverse", None, seed=3, step=5, size=32, digits=4)
    again, _ = pair_batch("reverse", None, seed=3, step=5, size=32, digits=4)
    assert pairs == again and cursor == {"step": 5, "examples": 160}
    assert pairs != pair_batch("reverse", None, seed=3, step=6, size=32, digits=4)[0]
    # the prompts are the ones supervised training sees at that step
    rng = _rng("train", "reverse", 3, 5)
    assert [p.prompt for p in pairs] == [TASKS["reverse"].make(rng, 4) for _ in range(32)]
    for p in pairs:
        digits = p.messages[-1][1].split()[-1]
        assert p.chosen == digits[::-1]
        assert p.rejected != p.chosen and len(p.rejected) in (4, 5) and p.rejected.isdigit()
    assert any(p.rejected == p.messages[-1][1].split()[-1] for p in pairs), "the unreversed string is a mistake"


def test_preference_jsonl_lines_and_their_errors(tmp_path):
    good = tmp_path / "pairs.jsonl"
    good.write_text(json.dumps({"prompt": "reverse 12", "chosen": "21", "rejected": "12"}) + "\n\n"
                    + json.dumps({"messages": [{"role": "system", "content": "be brief"},
                                               {"role": "user", "content": "reverse 34"}],
                                  "chosen": "43", "rejected": "34"}) + "\n")
    assert load_pairs(good) == [Pair((("user", "reverse 12"),), "21", "12"),
                                Pair((("system", "be brief"), ("user", "reverse 34")), "43", "34")]
    assert Pair.from_json(load_pairs(good)[1].to_json()) == load_pairs(good)[1]
    for line, why in [({"prompt": "x", "answer": "y"}, "missing string field 'chosen'"),
                      ({"prompt": "x", "chosen": "y"}, "missing string field 'rejected'"),
                      ({"prompt": "x", "chosen": "y", "rejected": "y"}, "the same text"),
                      ({"chosen": "y", "rejected": "z"}, "needs 'prompt'")]:
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps({"prompt": "ok", "chosen": "a", "rejected": "b"}) + "\n" + json.dumps(line) + "\n")
        with pytest.raises(DataError, match=f"{bad}:2: .*{why}"):
            load_pairs(bad)


def test_a_dpo_spec_with_supervised_jsonl_data_is_refused_before_anything_is_written(tmp_path, ledger_url, local_url):
    data = tmp_path / "sft.jsonl"
    data.write_text(json.dumps({"prompt": "reverse 12", "answer": "21"}) + "\n")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "reverse 12", "answer": "21"}) + "\n")
    spec = small_spec(tmp_path, local_url, name="badpairs", task={"data": str(data)},
                      eval={"prompts": str(prompts), "count": 1}, **DPO)
    proc = CliRunner().invoke(main, ["--ledger", ledger_url, "run", str(spec), "--run-id", "badpairs", "--quiet"])
    assert proc.exit_code == 1
    assert f"{data}:1: missing string field 'chosen'" in proc.stderr
    assert Ledger.open(ledger_url).stream_version("badpairs") == 0


# -- DPO and ORPO runs ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dpo_run(local_url, tmp_path_factory):
    """One uninterrupted DPO run: 4 steps, states at 0, 2, 4."""
    return completed_run(tmp_path_factory, local_url, "dpo", "dpo", **DPO)


def test_dpo_records_loss_margin_accuracy_against_a_separate_frozen_reference(dpo_run, local_url):
    spec, url = dpo_run
    events = Ledger.open(url).read("dpo")
    steps = steps_of(url, "dpo")
    assert sorted(steps) == [1, 2, 3, 4]
    for m in steps.values():
        assert {"loss", "margin", "accuracy"} <= set(m) and 0 <= m["accuracy"] <= 1
    # before the first update the policy is its reference: no margin, loss log 2
    assert steps[1]["margin"] == pytest.approx(0, abs=1e-4) and steps[1]["loss"] == pytest.approx(0.6931, abs=1e-3)
    assert steps[1]["accuracy"] == 0.0
    assert any(m["margin"] != 0 for s, m in steps.items() if s > 1), "the policy moved away from its reference"
    ref = next(ev for ev in events if ev.type == "ReferenceProvisioned")
    policy = next(ev for ev in events if ev.type == "TrainerProvisioned" and ev.data["role"] == "policy")
    assert ref.data["shared_with_policy"] is False and ref.data["trainer_job_id"] != policy.data["trainer_job_id"]
    assert fold(events).status == "completed"


def test_dpo_resume_after_sigkill_rebuilds_the_reference_cache_and_retires_the_old_reference(
        dpo_run, ledger_url, local_url):
    spec, url = dpo_run
    crashed = cli(ledger_url, "run", str(spec), "--run-id", "r", "--quiet", crash_at="event:StepCompleted:3")
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    old_reference = fold(Ledger.open(ledger_url).read("r")).reference_job_id
    assert trainer_state(local_url, old_reference) != "JOB_STATE_DELETED"  # the SIGKILL left it running

    assert resume_run("r", ledger_url=ledger_url, progress=False).status == "completed"
    # steps 3 and 4 were redone with a fresh cache: the very same values as the uninterrupted run
    assert steps_of(ledger_url, "r") == steps_of(url, "dpo")
    events = Ledger.open(ledger_url).read("r")
    retired = [ev for ev in events if ev.type == "CleanupApplied" and ev.data.get("role") == "reference"]
    assert [ev.data["trainer_job_id"] for ev in retired] == [old_reference]
    assert trainer_state(local_url, old_reference) == "JOB_STATE_DELETED"


def test_orpo_on_jsonl_pairs_needs_no_reference(tmp_path, ledger_url, local_url):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"reverse {n:03d}", "chosen": f"{n:03d}"[::-1],
                                         "rejected": f"{n:03d}"}) + "\n"
                             for n in range(100, 150) if str(n) != str(n)[::-1]))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"reverse {n}", "answer": str(n)[::-1]}) + "\n"
                               for n in (123, 456, 789, 321)))
    spec = small_spec(tmp_path, local_url, name="orpo", recipe={"kind": "orpo", "batch_size": 4, "beta": 0.1},
                      task={"data": str(pairs)}, eval={"prompts": str(prompts), "count": 0})
    assert run_spec(load_spec(spec), ledger_url=ledger_url, run_id="orpo", progress=False).status == "completed"
    events = Ledger.open(ledger_url).read("orpo")
    assert not [ev for ev in events if ev.type == "ReferenceProvisioned"]
    steps = steps_of(ledger_url, "orpo")
    assert sorted(steps) == [1, 2, 3, 4]
    for m in steps.values():
        assert {"loss", "margin", "accuracy", "nll"} <= set(m)
    assert steps[4]["nll"] < steps[1]["nll"], "ORPO's supervised term learns the chosen answers"
    # the recorded training set is the pairs, so a resume or rerun reads them back as pairs
    started = events[0].data
    stored = Ledger.open(ledger_url).get_json(started["prompt_sets"]["train"])
    assert stored[0] == {"messages": [{"role": "user", "content": "reverse 100"}], "chosen": "001",
                         "rejected": "100"}
