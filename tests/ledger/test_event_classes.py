"""Events as classes: each catalogue type is a frozen dataclass whose fields are its payload,
and a payload goes through its class and back unchanged (optional fields left out stay out,
given as null stay null, fields a newer writer added are kept)."""

from __future__ import annotations

from typing import Any

import pytest

from firetitan_track import events
from firetitan_track.blobs import canonical_json
from firetitan_track.events import CATALOGUE, EVENT_CLASSES, InvalidEvent, payload_problem

D1, D2 = "a" * 64, "b" * 64
UPSTREAM = {"run_id": "up-1", "status": "completed", "state_path": "state/up-1/4", "step": 4,
            "trainer_job_id": "job-up"}
CODE = {"git": {"commit": "c0ffee", "dirty": True, "diff_digest": D2}, "packages": {"torch": "2.5"}, "python": "3.11"}

# One payload per type, as its writers write it: every optional field given (some as null).
PAYLOADS: dict[str, dict[str, Any]] = {
    "RunStarted": {"spec": {"run": {"name": "x"}}, "spec_digest": D1, "code_version": "0.1", "seed": 7,
                   "backend": "local", "sweep_id": None, "trial_params": {"lr": 0.1}, "rerun_of": "r-0",
                   "prompt_sets": {"eval": D1}, "init_from": UPSTREAM, "prompt_sets_masked": {"eval": 0},
                   "rerun_data_differs": {"eval": 1}, "code": CODE},
    "RunResumed": {"from_step": 2, "state_path": "s/2", "superseded": [7, 8], "attempt": 2},
    "Reconnected": {"role": "policy", "trainer_job_id": "job", "reused": True, "deployment_id": None},
    "CleanupApplied": {"trainer": "deleted", "deployment": "scaled_to_zero", "error": "gone", "role": "reference",
                       "trainer_job_id": None},
    "RunFailed": {"error": "RuntimeError: boom", "step": 3},
    "RunCompleted": {"final_step": 4, "final_snapshot": None},
    "ProvisionRequested": {"role": "policy", "base_model": "m", "shape": None, "lora_rank": 8,
                           "deployment_id": "dep", "trainer_job_id": None, "base_url": "http://127.0.0.1:1"},
    "TrainerProvisioned": {"role": "policy", "trainer_job_id": "job", "base_model": "m", "shape": "ts",
                           "lora_rank": 8, "created": True, "partial": True},
    "DeploymentProvisioned": {"deployment_id": "dep", "base_model": "m", "created": None, "partial": False},
    "ReferenceProvisioned": {"trainer_job_id": "job", "created": False, "shared_with_policy": True},
    "StepCompleted": {"step": 1, "data_cursor": {"epoch": 0, "index": 8}, "micro_batches": 2,
                      "metrics": {"loss": 0.5, "tokens": 64}, "optimizer": {"learning_rate": 1e-3},
                      "skipped": "no datums"},
    "TrajectoriesRecorded": {"step": 1, "snapshot_path": None, "trajectories_digest": D1, "trajectories": 4,
                             "turns": 9},
    "StateSaveRequested": {"step": 2, "name": "state-2", "data_cursor": 16},
    "StateSaved": {"step": 2, "name": "state-2", "path": "s/2", "data_cursor": 16, "trainer_job_id": "job"},
    "SnapshotRequested": {"step": 2, "name": "snap-2"},
    "SnapshotSaved": {"step": 2, "name": "snap-2", "path": "p/2", "kind": "delta", "base_path": "p/0"},
    "SyncRequested": {"step": 2, "deployment_id": None, "snapshot_path": "p/2"},
    "WeightsSynced": {"step": 2, "deployment_id": "dep", "snapshot_path": "p/2", "duration_s": 0.25},
    "EvalStarted": {"eval_id": "e-1", "step": 2, "snapshot_path": "p/2", "prompt_set_digest": D1,
                    "prompt_count": 5, "sampling": {"n": 1}},
    "SamplesRecorded": {"eval_id": "e-1", "completions_digest": D2, "server_metrics": {"ttft": 0.1},
                        "concurrency_window": None},
    "EvalScored": {"eval_id": "e-1", "step": 2, "snapshot_path": "p/2", "prompt_set_digest": D1, "score": 0.8,
                   "metrics": {"correct": 4}},
    "PromotionRequested": {"snapshot_path": "p/2", "model_id": "mine", "eval_id": None, "score": None,
                           "trainer_job_id": "job", "checkpoint_id": None, "forced": True},
    "ModelPromoted": {"request_id": "ab12", "snapshot_path": "p/2", "model_id": "mine", "model": "accounts/a/m",
                      "eval_id": "e-1", "score": 0.8, "recovered": True},
    "PromotionFailed": {"request_id": "ab12", "snapshot_path": "p/2", "model_id": "mine", "error": "no"},
    "TrialPruned": {"step": 2, "score": 0.1, "reason": "median"},
    "SweepStarted": {"sweep_id": "sw-1", "spec_digest": D1, "grid": {"optim.learning_rate": [0.1, 0.2]},
                     "trials": [{"trial": 0, "run_id": "sw-1-0", "params": {"lr": 0.1}}], "search": "tpe",
                     "space": {"lr": "loguniform(1e-4, 1e-2)"}, "n_trials": 4, "prune": "median",
                     "overrides": {"run.steps": 4}},
    "TrialAssigned": {"trial": 1, "run_id": "sw-1-1", "params": {"lr": 0.2}, "optuna_trial": None},
    "ProgramStarted": {"attempt": 1, "command": ["python", "train.py"], "cwd": "/w", "started_by": "record",
                       "pid": 42, "metrics_file": None},
    "ProgramExited": {"attempt": 1, "outcome": "killed", "exit_status": -9, "signal": "SIGKILL",
                      "error": "KeyboardInterrupt", "recording_degraded": ["writing to the ledger"]},
    "StepRequested": {"step": 3, "trainer_job_id": None},
    "SamplesDrawn": {"deployment": "dep", "snapshot_at_send": "p/2", "snapshot_at_return": None,
                     "version_at_send": 1, "version_at_return": 2, "prompt_digest": D1, "completions_digest": D2,
                     "sequence_digests": [D1, D2], "sampling": {"n": 2}, "step": 3, "call": "sample",
                     "batch": 3, "replayed_from": "0f0f"},
    "MetricsLogged": {"step": None, "metrics": {"eval/acc": 0.5}, "source": "metrics_file", "snapshot_path": None,
                      "deployment": "dep", "trainer_step": 3},
    "StateLoaded": {"path": "s/2", "with_optimizer": True, "step": 2, "data_cursor": None, "trainer_job_id": "j"},
    "CallFailed": {"call": "hotload", "intent": "SyncRequested", "error": "Timeout", "step": None},
    "RecordingDegraded": {"reason": "writing to the ledger: disk full", "pid": 42},
}


def test_every_event_type_is_a_class_and_has_a_sample_here() -> None:
    assert sorted(PAYLOADS) == sorted(CATALOGUE)
    for cls in EVENT_CLASSES:
        assert CATALOGUE[cls.type_name].cls is cls
        assert CATALOGUE[cls.type_name] == cls.event_type()


@pytest.mark.parametrize("type_name", sorted(PAYLOADS))
def test_a_payload_goes_through_its_class_unchanged(type_name: str) -> None:
    et, data = CATALOGUE[type_name], PAYLOADS[type_name]
    assert payload_problem(et, data) is None  # the sample is one the catalogue accepts
    assert et.cls is not None
    event = et.cls.from_payload(data)
    assert canonical_json(event.payload()) == canonical_json(data)
    assert event.extra == {}
    # each optional field left out stays out (and reads None); the rest is unchanged
    for name in et.optional:
        fewer = {k: v for k, v in data.items() if k != name}
        event = et.cls.from_payload(fewer)
        assert getattr(event, name) is None
        assert canonical_json(event.payload()) == canonical_json(fewer)


def test_fields_a_newer_writer_added_are_kept() -> None:
    data = {**PAYLOADS["WeightsSynced"], "bytes_moved": 1024, "route": {"via": "rdma"}}
    event = events.WeightsSynced.from_payload(data)
    assert event.extra == {"bytes_moved": 1024, "route": {"via": "rdma"}}
    assert event.payload() == data


def test_a_class_names_what_a_payload_lacks_and_refuses_extra_that_shadows_a_field() -> None:
    with pytest.raises(InvalidEvent, match="SnapshotSaved: missing path, kind"):
        events.SnapshotSaved.from_payload({"step": 1, "name": "n", "base_path": None})
    with pytest.raises(InvalidEvent, match="extra holds step"):
        events.SnapshotRequested(step=1, name="n", extra={"step": 2})


def test_a_field_annotation_is_its_json_kind() -> None:
    et = CATALOGUE["SamplesDrawn"]
    assert et.fields["sequence_digests"].name == "an array of (a sha256 digest (64 lowercase hex))"
    assert et.fields["deployment"].name == "a string or null"
    assert et.optional["batch"].name == "an integer"  # may be left out, not null
    assert CATALOGUE["ProvisionRequested"].optional["base_url"].name == "a string or null"


def test_a_cleanup_outcome_is_one_of_the_ledgers_words_and_an_old_payload_reads_as_its_member() -> None:
    from firetitan_track.events import CleanupOutcome

    et = CATALOGUE["CleanupApplied"]
    assert et.fields["trainer"].name == "one of 'deleted', 'kept', 'scaled_to_zero', 'failed', 'unknown'"
    old = {"trainer": "failed", "deployment": "unknown", "error": "still there"}  # as a ledger stored it
    assert payload_problem(et, old) is None
    fact = events.CleanupApplied.from_payload(old)
    assert (fact.trainer, fact.deployment) == (CleanupOutcome.FAILED, CleanupOutcome.UNKNOWN)
    assert type(fact.trainer) is CleanupOutcome
    assert canonical_json(fact.payload()) == canonical_json(old)
    assert payload_problem(et, {"trainer": "scaled_down", "deployment": "kept"}) == (
        "trainer is a string 'scaled_down', not one of 'deleted', 'kept', 'scaled_to_zero', 'failed', 'unknown'")
    with pytest.raises(InvalidEvent, match="CleanupApplied: deployment is 'scale_to_zero'"):
        events.CleanupApplied(trainer=CleanupOutcome.KEPT, deployment="scale_to_zero")  # an action, not an outcome


# -- through the ledger ----------------------------------------------------------------------


@pytest.fixture
def ledger(tmp_path):  # type: ignore[no-untyped-def]
    from firetitan_track import Ledger

    with Ledger.open(f"sqlite:///{tmp_path}/ledger.db") as ledger:
        yield ledger


def _stored(ledger: Any, run_id: str) -> list[tuple[int, str]]:
    import sqlalchemy as sa

    with ledger.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.text("SELECT schema_version, data FROM events WHERE run_id = :r "
                                                       "ORDER BY version"), {"r": run_id})]


def test_reading_gives_each_event_as_its_class(ledger: Any) -> None:
    from firetitan_track.events import NewEvent

    ledger.append("r", [NewEvent(name, data) for name, data in PAYLOADS.items()], 0)
    for ev in ledger.read("r"):
        assert type(ev.fact) is CATALOGUE[ev.type].cls
        assert ev.fact.payload() == ev.data == PAYLOADS[ev.type]


def test_a_field_from_a_newer_writer_survives_read_and_write(ledger: Any) -> None:
    from firetitan_track.events import NewEvent

    newer = {**PAYLOADS["StateSaved"], "shard_count": 8, "storage": {"tier": "cold"}}
    ledger.append("newer", [NewEvent("StateSaved", newer)], 0)  # as a newer version writes it
    [read] = ledger.read("newer")
    assert read.fact.extra == {"shard_count": 8, "storage": {"tier": "cold"}}
    assert read.fact.path == newer["path"]
    ledger.append("copy", [NewEvent(read.fact.type_name, read.fact.payload())], 0)  # written back by this one
    assert _stored(ledger, "copy") == _stored(ledger, "newer")


class Scored(events.Event):
    """a test type at schema version 2: v1 held score (0..1), v2 holds score_pct"""

    schema_version = 2
    score_pct: float
    note: str | None = events.optional()


def test_an_old_version_payload_is_upcast_into_its_class(ledger: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from firetitan_track.events import NewEvent

    monkeypatch.setitem(CATALOGUE, "Scored", Scored.event_type())
    monkeypatch.setitem(events._UPCASTERS, ("Scored", 1), lambda d: {"score_pct": d.pop("score") * 100, **d})
    ledger.append("r", [NewEvent("Scored", {"score": 0.5, "seen_by": "v1"}, schema_version=1),
                        NewEvent("Scored", Scored(score_pct=7.0).payload())], 0)
    old, new = ledger.read("r")
    assert old.fact == Scored(score_pct=50.0, extra={"seen_by": "v1"}) and old.schema_version == 2
    assert new.fact == Scored(score_pct=7.0) and new.fact.note is None
    assert _stored(ledger, "r")[0] == (1, '{"score":0.5,"seen_by":"v1"}')  # never rewritten
    assert ledger.verify() == []


def test_a_type_this_code_does_not_know_reads_as_no_class(ledger: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from firetitan_track.events import NewEvent
    from firetitan_track.projections.run_state import fold

    monkeypatch.setitem(CATALOGUE, "FromTheFuture", events.EventType("FromTheFuture", 1, ()))
    ledger.append("r", [NewEvent("RunCompleted", PAYLOADS["RunCompleted"]), NewEvent("FromTheFuture", {"x": 1})], 0)
    monkeypatch.delitem(CATALOGUE, "FromTheFuture")
    completed, future = ledger.read("r")
    assert future.fact is None and future.data == {"x": 1}
    assert fold([completed, future]).status == "completed"  # the fold passes over it


# -- writing ---------------------------------------------------------------------------------


def test_new_event_takes_an_instance_and_writes_its_payload() -> None:
    from firetitan_track.events import new_event

    ev = new_event(events.CleanupApplied(trainer="deleted", deployment="kept", error=None, trainer_job_id=None))
    # error may not be null: None leaves it out; trainer_job_id may be: None is written
    assert (ev.type, ev.data) == ("CleanupApplied", {"trainer": "deleted", "deployment": "kept", "trainer_job_id": None})
    with pytest.raises(InvalidEvent, match="RunFailed: step is a string"):
        new_event(events.RunFailed(error="x", step="3"))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="takes no fields as keywords"):
        new_event(events.RunFailed(error="x", step=3), step=4)


def test_replace_keeps_what_was_left_out_left_out() -> None:
    drawn = events.SamplesDrawn.from_payload(PAYLOADS["SamplesDrawn"]).replace(call=None)
    again = drawn.replace(replayed_from="cafe")
    assert "call" not in again.payload() and again.payload()["replayed_from"] == "cafe"
    asked = events.ProvisionRequested(role="reference", base_model="m", shape=None, lora_rank=0)
    assert asked.replace(lora_rank=8).payload() == {"role": "reference", "base_model": "m", "shape": None,
                                                    "lora_rank": 8}
