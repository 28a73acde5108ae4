"""IGPO through the runner: the number search's environment, the turn advantages, the spec's
refusals, and one small run (3 steps) whose record is checked fact by fact, then carried
through a SIGKILL and resume, rerun, a sweep, audit, lineage and the MLflow export."""

from __future__ import annotations

import json
import signal

import pytest
from click.testing import CliRunner

from firetitan_track import Ledger
from firetitan_track.projections.lineage import lineage
from firetitan_track.projections.run_state import authoritative, fold
from runner.cli import main
from runner.loop import rerun, resume_run
from runner.recipes.igpo import turn_advantages
from runner.spec import Spec, SpecError
from runner.tasks import TASKS, Reply, train_batch
from tests.helpers import cli, completed_run, small_spec

IGPO = {"recipe": {"kind": "igpo", "batch_size": 2, "group_size": 2, "max_tokens": 2, "turns": 3},
        "task": {"name": "search", "digits": 1}, "run": {"steps": 3}, "schedule": {"save_every": 2, "eval_every": 3},
        "eval": {"count": 4}, "sampling": {"max_tokens": 2}}


def history(url: str, run_id: str) -> list[tuple]:
    """Steps (metrics), the trajectories each trained on, and evals, free of ids and timings."""
    out = []
    for ev in authoritative(Ledger.open(url).read(run_id)):
        d = ev.data
        if ev.type == "StepCompleted":
            out.append(("step", d["step"], tuple(sorted((k, round(v, 5)) for k, v in d["metrics"].items()))))
        elif ev.type == "TrajectoriesRecorded":
            out.append(("trajectories", d["step"], d["trajectories_digest"]))
        elif ev.type == "EvalScored":
            out.append(("eval", d["step"], d["prompt_set_digest"], d["score"]))
    return out


# -- the task and the advantages ----------------------------------------------------------------


def test_the_number_search_answers_each_guess_and_draws_its_episodes_from_seed_and_step():
    reply = TASKS["search"].reply
    assert TASKS["search"].multi_turn and not TASKS["add"].multi_turn
    assert reply("7", "5") == Reply("higher", False)
    assert reply("7", "9 then 2") == Reply("lower", False)  # the first number in the turn is the guess
    assert reply("7", "07") == Reply("correct", True)
    assert reply("7", "seven") == Reply("number?", False)
    assert {reply("7", str(g)).text for g in range(10)} <= set(TASKS["search"].replies)
    batch, cursor = train_batch("search", None, seed=3, step=5, size=32, digits=1)
    assert batch == train_batch("search", None, seed=3, step=5, size=32, digits=1)[0]
    assert batch != train_batch("search", None, seed=3, step=6, size=32, digits=1)[0]
    assert cursor == {"step": 5, "examples": 160}
    assert {ex.messages for ex in batch} == {(("user", "guess 0-9"),)}
    assert {int(ex.answer) for ex in batch} <= set(range(10)) and len({ex.answer for ex in batch}) > 3


def test_turn_advantages_center_gains_and_outcomes_and_discount_later_turns():
    def flat(rows):
        return [x for row in rows for x in row]

    gains, outcomes = [[0.5, -0.1], [0.2]], [1.0, 0.0]
    # gains less their mean 0.2: [0.3, -0.3], [0.0]; outcomes less theirs: +0.5, -0.5 at the last turns
    assert flat(turn_advantages(gains, outcomes, 0.0)) == pytest.approx([0.3, 0.2, -0.5])
    assert flat(turn_advantages(gains, outcomes, 0.5)) == pytest.approx([0.3 + 0.5 * 0.2, 0.2, -0.5])
    assert flat(turn_advantages([[0.1, 0.1], [0.1]], [1.0, 1.0], 0.9)) == pytest.approx([0.0, 0.0, 0.0])


@pytest.mark.parametrize("sections, key", [
    ({"recipe": {"kind": "igpo"}, "task": {"name": "add"}}, "task.name: 'add' is a single-turn task"),
    ({"recipe": {"kind": "grpo"}, "task": {"name": "search"}}, "recipe.kind: task 'search' is multi-turn"),
    ({"recipe": {"kind": "igpo", "gamma": 1.5}, "task": {"name": "search"}}, "recipe.gamma: must be in [0, 1]"),
    ({"recipe": {"kind": "igpo", "turns": 0}, "task": {"name": "search"}}, "recipe.turns: must be at least 1"),
])
def test_igpo_specs_that_cannot_run_are_refused_naming_the_key(sections, key):
    with pytest.raises(SpecError, match=key.replace("[", r"\[").replace("]", r"\]")):
        Spec.from_dict(sections, source="s.toml")


# -- one run, and what the runner's commands do with it ------------------------------------------


@pytest.fixture(scope="module")
def igpo_run(local_url, tmp_path_factory):
    """One uninterrupted IGPO run: 3 steps, states at 0, 2, 3, evals at 0 and 3."""
    return completed_run(tmp_path_factory, local_url, "igpo", "igpo", **IGPO)


def test_an_igpo_run_records_each_trajectorys_turns_gains_and_the_snapshot_that_sampled_them(igpo_run):
    spec, url = igpo_run
    ledger = Ledger.open(url)
    events = ledger.read("igpo")
    assert fold(events).status == "completed"
    rollout_syncs = {ev.data["step"]: ev.data["snapshot_path"] for ev in events
                     if ev.type == "WeightsSynced" and ev.data["snapshot_path"].startswith("rollout-")}
    recorded = [ev for ev in events if ev.type == "TrajectoriesRecorded"]
    steps = {ev.data["step"]: ev.data["metrics"] for ev in events if ev.type == "StepCompleted"}
    assert [ev.data["step"] for ev in recorded] == sorted(steps) == [1, 2, 3]
    reply = TASKS["search"].reply
    for ev in recorded:
        d = ev.data
        assert d["snapshot_path"] == rollout_syncs[d["step"]]  # on-policy: that step's own weights
        stored = ledger.get_json(d["trajectories_digest"])
        assert len(stored) == d["trajectories"] == 2 * 2  # batch_size x group_size
        assert sum(len(t["turns"]) for t in stored) == d["turns"]
        m = steps[d["step"]]
        assert m["ig_passes"] == d["trajectories"] + d["turns"]  # a baseline pass, then one per turn
        assert m["rollouts"] == d["trajectories"] and m["turns"] == d["turns"] / d["trajectories"]
        assert m["reward"] == sum(t["outcome"] for t in stored) / len(stored)
        assert m["info_gain"] == pytest.approx(sum(turn["info_gain"] for t in stored for turn in t["turns"]) / d["turns"])
        for t in stored:
            turns, previous = t["turns"], t["baseline_logprob"]
            assert 1 <= len(turns) <= 3 and previous < 0
            for k, turn in enumerate(turns):
                # the environment's reply is the task's, and an episode ends at the first "correct"
                assert turn["reply"] == reply(t["answer"], turn["text"]).text
                assert (turn["reply"] == "correct") == (k == len(turns) - 1 and t["outcome"] == 1.0)
                assert turn["info_gain"] == pytest.approx(turn["answer_logprob"] - previous)
                previous = turn["answer_logprob"]
                assert isinstance(turn["seed"], int) and turn["span"][1] > turn["span"][0]
            assert len({turn["seed"] for turn in turns}) == len(turns)
    # the eval plays greedy episodes and scores the solved ones
    scored = [ev for ev in events if ev.type == "EvalScored"]
    assert [ev.data["step"] for ev in scored] == [0, 3]
    for ev in events:
        if ev.type == "SamplesRecorded":
            episodes = ledger.get_json(ev.data["completions_digest"])
            assert len(episodes) == 4
            for e in episodes:
                assert e["score"] == (1.0 if e["turns"][-1]["reply"] == "correct" else 0.0)


def test_an_igpo_run_killed_after_a_step_resumes_to_the_uninterrupted_history(igpo_run, ledger_url):
    """Killed at step 3's eval, after its trajectories and StepCompleted were recorded and
    before state 3: the resume supersedes them, restarts from state 2 and samples the very
    same trajectories again (every request is seeded)."""
    spec, url = igpo_run
    crashed = cli(ledger_url, "run", str(spec), "--run-id", "r", "--quiet", crash_at="event:EvalStarted:2")
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    assert resume_run("r", ledger_url=ledger_url, progress=False).status == "completed"
    assert history(ledger_url, "r") == history(url, "igpo")
    events = Ledger.open(ledger_url).read("r")
    superseded = set(next(ev for ev in events if ev.type == "RunResumed").data["superseded"])
    assert [ev.data["step"] for ev in events if ev.type == "TrajectoriesRecorded" and ev.version in superseded] == [3]


def test_igpo_through_rerun_sweep_audit_lineage_and_the_mlflow_export(igpo_run, mlflow_server, tmp_path):
    spec, url = igpo_run
    ledger = Ledger.open(url)
    # rerun: from the record alone, the same trajectories, metrics and scores
    assert rerun("igpo", ledger_url=url, new_run_id="again", progress=False).status == "completed"
    assert history(url, "again") == history(url, "igpo")

    # lineage of the final snapshot names the snapshots its training data were sampled from
    events = ledger.read("igpo")
    final = [ev.data["path"] for ev in events if ev.type == "SnapshotSaved"][-1]  # step 3's eval snapshot
    found = lineage(ledger, final, "igpo")
    rollouts = {ev.data["step"]: ev.data["snapshot_path"] for ev in events if ev.type == "TrajectoriesRecorded"}
    assert [(row["step"], row["drawn_on"]) for row in found.data] == [(s, {p: 4}) for s, p in sorted(rollouts.items())]
    shown = CliRunner().invoke(main, ["--ledger", url, "lineage", final, "--run", "igpo"])
    assert shown.exit_code == 0, shown.output
    assert "step 3: 4 trajectories" in shown.output and rollouts[3] in shown.output

    audit = CliRunner().invoke(main, ["--ledger", url, "audit", "igpo", "--json"])
    assert audit.exit_code == 0, audit.output
    assert [row["step"] for row in json.loads(audit.output)] == [0, 3]

    # the MLflow export: the step metrics and each step's trajectories as an artifact
    from mlflow import MlflowClient

    from firetitan_track.projections.mlflow import export_mlflow

    assert export_mlflow(ledger, mlflow_server, experiment="igpo-export", run_ids=["igpo"]).runs == ["igpo"]
    client = MlflowClient(tracking_uri=mlflow_server)
    [ml] = client.search_runs([client.get_experiment_by_name("igpo-export").experiment_id],
                              "tags.ledger_run_id = 'igpo'")
    steps = {ev.data["step"]: ev.data["metrics"] for ev in events if ev.type == "StepCompleted"}
    assert sorted((m.step, m.value) for m in client.get_metric_history(ml.info.run_id, "train/info_gain")) == \
        [(s, m["info_gain"]) for s, m in sorted(steps.items())]
    stored = {a.path for a in client.list_artifacts(ml.info.run_id, "trajectories")}
    assert stored == {f"trajectories/step-{s}.json" for s in steps}

    # a sweep: one trial of one step, recorded and linked like any other
    sweep = CliRunner().invoke(main, ["--ledger", url, "sweep", str(spec), "--grid", "recipe.gamma=0.5",
                                      "--sweep-id", "ig", "--steps", "1", "--no-mlflow", "--quiet"])
    assert sweep.exit_code == 0, sweep.output
    trial = [r.run_id for r in ledger.runs() if r.run_id.startswith("ig-t")]
    assert len(trial) == 1
    trial_events = ledger.read(trial[0])
    assert fold(trial_events).status == "completed"
    assert trial_events[0].data["spec"]["recipe"]["gamma"] == 0.5
    assert [ev.data["step"] for ev in trial_events if ev.type == "TrajectoriesRecorded"] == [1]


def test_an_episode_longer_than_the_context_is_refused_before_anything_is_written(local_url, ledger_url, tmp_path):
    spec = small_spec(tmp_path, local_url, name="long", **{**IGPO, "recipe": {**IGPO["recipe"], "turns": 100}})
    proc = CliRunner().invoke(main, ["--ledger", ledger_url, "run", str(spec), "--run-id", "long", "--quiet"])
    assert proc.exit_code == 1
    assert "sampling.max_tokens: an episode of eval prompt 1 may take" in proc.output
    assert "lower recipe.turns" in proc.output
    assert Ledger.open(ledger_url).stream_version("long") == 0
