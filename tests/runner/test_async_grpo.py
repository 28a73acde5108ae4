"""async_grpo: rollouts sampled while the trainer trains, at most max_offpolicy_versions
behind; the ledger names each step's rollouts, the snapshot each came from and their
staleness; killed anywhere, a resume trains on the recorded rollouts and its history
equals the uninterrupted run's. Also: a step without an optimizer step, or a metric the
trainer never reported, is not recorded as a zero."""

from __future__ import annotations

import signal
from typing import Any

import pytest

from firetitan_track import Ledger
from firetitan_track.projections.lineage import lineage
from firetitan_track.projections.run_state import authoritative, fold

from tests.helpers import cli, completed_run

# 4 steps, one version of lag (K = 1): step 1 trains rollouts of version 0, steps 2-4 of
# version s-2; batches 1 and 2 are sampled from version 0, batch b > 2 from version b-2,
# while step b-1 trains. States and evals at 0, 2, 4. 2 prompts x 2 rollouts per batch.
ASYNC = {"run": {"steps": 4},
         "recipe": {"kind": "async_grpo", "batch_size": 2, "group_size": 2, "max_tokens": 3, "kl_coef": 0.1,
                    "max_offpolicy_versions": 1},
         "task": {"name": "add", "digits": 1}}

# Where the runner dies, and the batches whose recorded rollouts the resume must train on
# as recorded (re-recorded from the crashed attempt's record) rather than sample anew.
CRASH_POINTS = {
    "rollout:14": set(),                      # mid-sampling: batch 4's rollouts in flight (step 3)
    "event:SamplesDrawn:4": {4},              # after admission: batch 4 recorded, step 3 not trained
    "before:SnapshotRequested:3": {1, 2},     # after step 2's optimizer step, before its sync
    "event:WeightsSynced:4": {4},             # after step 3's sync, before rollouts are sampled from it
}


def history(ledger_url: str, run_id: str) -> list[tuple]:
    """The run's authoritative history, free of ids and timings: steps (with the sequences
    each trained on, resolved through the SamplesDrawn it names), batches drawn, states, evals."""
    ledger = Ledger.open(ledger_url)
    events = authoritative(ledger.read(run_id))
    drawn = {ev.event_id: ev.data for ev in events if ev.type == "SamplesDrawn"}
    out: list[tuple] = []
    for ev in events:
        d = ev.data
        if ev.type == "StepCompleted":
            trained = tuple(drawn[e]["sequence_digests"][i] for e, i in ledger.get_json(d["provenance"]["samples_digest"]))
            m = d["metrics"]
            out.append(("step", d["step"], tuple(sorted(d["data_cursor"].items())), round(m["loss"], 5),
                        round(m["importance_weight"], 4), tuple(sorted(d["version_offsets"].items())), trained))
        elif ev.type == "SamplesDrawn":
            out.append(("drawn", d["batch"], d["version_at_send"], tuple(d["sequence_digests"])))
        elif ev.type == "StateSaved":
            out.append(("state", d["step"], str(d["data_cursor"])))
        elif ev.type == "EvalScored":
            out.append(("eval", d["step"], d["prompt_set_digest"], d["score"]))
    return sorted(out, key=repr)


@pytest.fixture(scope="module")
def reference(local_url, tmp_path_factory):
    """One uninterrupted run: what every resumed run must reproduce, and what the record says."""
    spec, url = completed_run(tmp_path_factory, local_url, "async", "ref", **ASYNC)
    return spec, url, history(url, "ref")


def test_each_step_names_its_rollouts_their_snapshot_and_staleness(reference):
    _, url, expected = reference
    ledger = Ledger.open(url)
    events = ledger.read("ref")
    steps = [ev.data for ev in events if ev.type == "StepCompleted"]
    drawn = {ev.event_id: ev.data for ev in events if ev.type == "SamplesDrawn"}
    synced = [ev.data["snapshot_path"] for ev in events if ev.type == "WeightsSynced"]
    # one publication per step (the evals at 2 and 4 sample the step's own sync), after the baseline's
    assert len(synced) == 1 + 4
    # batch b sampled from version max(0, b-2), on the snapshot published as that version
    assert sorted((d["batch"], d["version_at_send"]) for d in drawn.values()) == [(1, 0), (2, 0), (3, 1), (4, 2)]
    assert all(d["snapshot_at_send"] == synced[d["version_at_send"]] == d["snapshot_at_return"] for d in drawn.values())
    # staleness in the recorder's field: versions published before the step minus before the sample was sent
    assert [s["version_offsets"] for s in steps] == [{"min": 0, "max": 0, "mean": 0.0}] + [{"min": 1, "max": 1, "mean": 1.0}] * 3
    for s in steps:
        rows = ledger.get_json(s["provenance"]["samples_digest"])
        assert {drawn[e]["batch"] for e, _ in rows} == {s["step"]}  # step s trained batch s, nothing else
        assert s["provenance"]["datums"] == len(rows) == s["metrics"]["rollouts"]
        assert "skipped" not in s and {"loss", "importance_weight", "clipped", "kl", "reward"} <= set(s["metrics"])
    # the KL term moved the weights, so the lagging batches' importance weights are no longer 1
    assert any(abs(s["metrics"]["importance_weight"] - 1) > 1e-4 for s in steps[1:])
    # lineage of the last snapshot names the snapshots its training data were sampled from
    found = lineage(ledger, synced[-1], "ref")
    assert found.drawn_on == {synced[0]: 8, synced[1]: 4, synced[2]: 4}
    assert [row["version_offsets"]["max"] for row in found.data] == [0, 1, 1, 1]


@pytest.mark.parametrize("point", list(CRASH_POINTS))
def test_resume_after_sigkill_trains_the_recorded_rollouts_and_reproduces_the_history(point, reference, ledger_url):
    spec, _, expected = reference
    crashed = cli(ledger_url, "run", str(spec), "--run-id", "r", "--quiet", crash_at=point)
    assert crashed.returncode == -signal.SIGKILL, (point, crashed.stderr[-2000:])
    before = {ev.event_id: ev.data for ev in Ledger.open(ledger_url).read("r") if ev.type == "SamplesDrawn"}
    from runner.loop import resume_run

    assert resume_run("r", ledger_url=ledger_url, progress=False).status == "completed"
    events = Ledger.open(ledger_url).read("r")
    assert fold(events).status == "completed"
    assert history(ledger_url, "r") == expected
    # every batch drawn once and trained once in the authoritative history
    kept = [ev.data for ev in authoritative(events) if ev.type == "SamplesDrawn"]
    assert sorted(d["batch"] for d in kept) == [1, 2, 3, 4]
    # the rollouts the crashed attempt had admitted from weights the history holds were
    # trained as recorded, not sampled again
    replayed = {d["batch"]: d["replayed_from"] for d in kept if "replayed_from" in d}
    assert set(replayed) == CRASH_POINTS[point]
    assert all(before[origin]["batch"] == batch for batch, origin in replayed.items())


def test_a_step_without_a_completion_is_recorded_skipped_with_no_loss():
    """The shared skip path (grpo's too): no rollout has a completion, so no optimizer step
    runs (the trainer is never called: ``policy`` is None) and no loss is made up."""
    from runner.recipes.async_grpo import Batch, _train
    from runner.recipes.base import StepContext
    from runner.recipes.grpo import NO_COMPLETION
    from runner.spec import Spec

    ctx = StepContext(Spec.from_dict({"recipe": {"kind": "async_grpo"}}), tracked=None, policy=None, reference=None,
                      tokenizer=None, adam=None, loop=None, new_controller=lambda: None, step=1)
    empty = [{"prompt": 0, "text": "", "reward": 0.0, "prompt_len": 3, "tokens": [1, 2, 3], "sampling_logprobs": []}]
    metrics = _train(ctx, Batch(step=1, version=0, event_id=None, rollouts=empty * 2))
    assert metrics == {"rollouts": 0.0}
    assert ctx.step_record == {"skipped": NO_COMPLETION}
    from firetitan_track.events import new_event

    new_event("StepCompleted", step=1, data_cursor=None, micro_batches=1, metrics=metrics, optimizer={},
              **ctx.step_record)  # the catalogue takes it as recorded


def test_sft_leaves_out_a_loss_the_trainer_did_not_report():
    """The local trainer always reports ``loss:sum``; a trainer that does not (a fault this
    service cannot be made to show) is stood in for by a client that answers without it."""
    from runner.recipes import sft
    from runner.recipes.base import StepContext
    from runner.spec import Spec
    from runner.tasks import train_batch

    class Answer:
        def __init__(self, metrics: dict[str, Any]):
            self.metrics = metrics

        def result(self) -> "Answer":
            return self

    class Trainer:
        def forward_backward(self, data, loss_fn):
            return Answer({})

        def optim_step(self, adam):
            return Answer({"grad_norm": 0.5})

    from runner.local.catalogue import tokenizer_path
    from transformers import AutoTokenizer

    ctx = StepContext(Spec(), tracked=None, policy=Trainer(), reference=None,
                      tokenizer=AutoTokenizer.from_pretrained(tokenizer_path()), adam=None, loop=None,
                      new_controller=lambda: None, step=1)
    batch, _ = train_batch("reverse", None, seed=0, step=1, size=2, digits=3)
    metrics = sft.train_step(ctx, batch)
    assert "loss" not in metrics and metrics["optim/grad_norm"] == 0.5 and metrics["tokens"] > 0


def test_an_eval_of_no_prompts_is_refused_not_scored(ledger):
    from firetitan_track.tracking import Recorder, TrackedService

    tracked = TrackedService(object(), Recorder(ledger, "e"), base_model="m", shape=None, lora_rank=0,
                             deployment_id=None)
    import asyncio

    with pytest.raises(ValueError, match="no score"):
        asyncio.run(tracked.evaluate(None, [], snapshot_path=None, sampling={}, grade=lambda ex, text: 1.0))
    assert ledger.stream_version("e") == 0  # nothing recorded, no 0.0


def test_max_offpolicy_versions_is_bounded_before_anything_runs():
    from runner.recipes.async_grpo import MAX_OFFPOLICY_VERSIONS
    from runner.spec import Spec, SpecError

    for bad in (-1, MAX_OFFPOLICY_VERSIONS + 1):
        with pytest.raises(SpecError, match="recipe.max_offpolicy_versions"):
            Spec.from_dict({"recipe": {"kind": "async_grpo", "max_offpolicy_versions": bad}}, source="s.toml")
    with pytest.raises(SpecError, match="recipe.clip_epsilon"):
        Spec.from_dict({"recipe": {"kind": "async_grpo", "clip_epsilon": 1.5}}, source="s.toml")
