"""audit, lineage and replay: every score tied to its snapshot, prompts and steps."""

from __future__ import annotations

import json

import sqlalchemy as sa
from click.testing import CliRunner

from firetitan_track import Ledger
from firetitan_track.projections.audit import audit
from firetitan_track.projections.lineage import lineage
from firetitan_track.projections.replay import replay
from runner.cli import main
from tests.projections.streams import PROMPTS, SAMPLING, RunWriter, write_run


def _cli(ledger_url: str, *args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(main, ["--ledger", ledger_url, *args])


def test_audit_has_one_row_per_eval(ledger: Ledger) -> None:
    write_run(ledger, "r1", steps=6)
    rows = audit(ledger, "r1")
    assert [(r.step, r.snapshot_path, r.snapshot_kind, r.score) for r in rows] == [
        (2, "snapshots/r1/sampler-2", "base", 0.2),
        (4, "snapshots/r1/sampler-4", "delta", 0.4),
        (6, "snapshots/r1/sampler-6", "delta", 0.6)]
    for r in rows:
        assert ledger.get_json(r.prompt_set_digest) == PROMPTS
        assert (r.prompt_count, r.sampling) == (len(PROMPTS), SAMPLING)
        assert r.sync_duration_s == 0.25 + r.step / 100
        assert r.completions_digest is not None


def test_audit_shows_only_the_authoritative_evals(ledger: Ledger) -> None:
    w = RunWriter(ledger, "r1")
    w.start()
    w.train(1, 4)  # state saved at 4, then snapshot, sync and eval of step 4
    w.step(5)
    w.resume()  # supersedes the step-4 eval and step 5
    w.train(5, 6, score=lambda n: 0.9)
    assert [(r.step, r.score) for r in audit(ledger, "r1")] == [(2, 0.2), (6, 0.9)]


def test_audit_command(ledger_url: str, ledger: Ledger) -> None:
    write_run(ledger, "r1", steps=4)
    table = _cli(ledger_url, "audit", "r1")
    assert table.exit_code == 0
    assert "snapshots/r1/sampler-4" in table.output and "temperature=0.0" in table.output
    rows = json.loads(_cli(ledger_url, "audit", "r1", "--json").output)
    assert [r["score"] for r in rows] == [0.2, 0.4]
    missing = _cli(ledger_url, "audit", "nope")
    assert missing.exit_code == 1 and "no run 'nope'" in missing.output


def test_lineage_names_steps_base_chain_and_evals(ledger: Ledger) -> None:
    write_run(ledger, "other", steps=2)
    write_run(ledger, "r1", steps=6)
    found = lineage(ledger, "snapshots/r1/sampler-6")
    assert found.run_id == "r1"
    assert [(s["step"], s["data_cursor"]) for s in found.steps] == [(n, 4 * n) for n in range(1, 7)]
    assert [s["step"] for s in found.since_previous] == [5, 6]
    assert found.previous_snapshot == "snapshots/r1/sampler-4"
    assert [(b["path"], b["kind"]) for b in found.base_chain] == [
        ("snapshots/r1/sampler-6", "delta"), ("snapshots/r1/sampler-2", "base")]
    assert [(e.step, e.score) for e in found.evals] == [(6, 0.6)]


def test_lineage_command(ledger_url: str, ledger: Ledger) -> None:
    write_run(ledger, "r1", steps=4)
    out = _cli(ledger_url, "lineage", "snapshots/r1/sampler-4")
    assert out.exit_code == 0
    assert "steps 3..4" in out.output and "snapshots/r1/sampler-2  (base" in out.output
    as_json = json.loads(_cli(ledger_url, "lineage", "snapshots/r1/sampler-2", "--json").output)
    assert as_json["base_chain"] == [{"path": "snapshots/r1/sampler-2", "name": "sampler-2", "kind": "base",
                                      "step": 2, "base_path": None}]
    missing = _cli(ledger_url, "lineage", "snapshots/nope")
    assert missing.exit_code == 1 and "no snapshot 'snapshots/nope'" in missing.output


def test_replay_rebuilds_state_and_verifies(ledger_url: str, ledger: Ledger) -> None:
    write_run(ledger, "r1", steps=4)
    result = replay(ledger, "r1")
    assert result.intact and result.state.status == "completed" and result.state.step == 4
    assert len(result.evals) == 2
    out = _cli(ledger_url, "replay", "r1")
    assert out.exit_code == 0 and "chain intact" in out.output

    with ledger.engine.begin() as conn:  # edit one payload behind the ledger's back
        conn.execute(sa.text("UPDATE events SET data = replace(data, '0.4', '0.9') "
                             "WHERE run_id = 'r1' AND type = 'EvalScored'"))
    broken = _cli(ledger_url, "replay", "r1")
    assert broken.exit_code == 1 and "BROKEN" in broken.output
    assert _cli(ledger_url, "replay", "nope").exit_code == 1
