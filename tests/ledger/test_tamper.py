"""Tampering with a ledger's database behind its back: what ``verify`` names, and what every
reading view says instead of showing altered data (or crashing on it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from firetitan_track import Ledger
from firetitan_track.blobs import canonical_json
from firetitan_track.signing import SIGN_EVERY
from runner.cli import main
from tests.ledger.forge import rechained
from tests.projections.streams import write_run


def _cli(url: str, *args: str) -> Any:
    return CliRunner().invoke(main, ["--ledger", url, *args])


def _sql(ledger: Ledger, statement: str, **params: Any) -> None:
    with ledger.engine.begin() as conn:
        conn.execute(sa.text(statement), params)


def _refused(url: str, args: list[str], *expected: str) -> str:
    result = _cli(url, *args)
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output, result.output
    for text in expected:
        assert text in result.output, result.output
    return result.output


def _rewrite(ledger: Ledger, run_id: str, edit: Any) -> None:
    """Edit a run's payloads in the database and recompute its chain, as a forger with SQL would."""
    rows = [dict(r._mapping) for r in ledger.engine.connect().execute(sa.text(
        "SELECT * FROM events WHERE run_id = :r ORDER BY version"), {"r": run_id})]
    import json

    events = [{**r, "data": json.loads(r["data"])} for r in rows]
    for ev in events:
        edit(ev)
    for ev in rechained(events):
        _sql(ledger, "UPDATE events SET data = :d, type = :t, hash = :h WHERE run_id = :r AND version = :v",
             d=canonical_json(ev["data"]), t=ev["type"], h=ev["hash"], r=run_id, v=ev["version"])


@pytest.fixture
def url(ledger_url: str) -> str:
    with Ledger.open(ledger_url) as ledger:
        write_run(ledger, "r1", steps=4)
        write_run(ledger, "r2", steps=2)
    return ledger_url


def test_a_run_is_signed_at_its_end_and_every_64_events(ledger_url: str) -> None:
    with Ledger.open(ledger_url) as ledger:
        write_run(ledger, "long", steps=40)
        heads = ledger.signed_heads("long")
        n = ledger.stream_version("long")
        assert [h.version for h in heads] == [*range(SIGN_EVERY - 1, n - 1, SIGN_EVERY), n - 1]
        assert all(h.valid() and h.public_key == ledger.signing_key().public_text for h in heads)
        key_file = Path(ledger_url.removeprefix("sqlite:///") + ".signing-key")
        assert key_file.stat().st_mode & 0o777 == 0o600  # beside the database, never inside it
        private = key_file.read_bytes()
        raw = ledger.engine.connect().execute(sa.text("SELECT * FROM signed_heads")).all()
        assert private not in repr(raw).encode()
    assert _cli(ledger_url, "key").output.split()[0] == heads[0].public_key


def test_a_deleted_blob_is_named_and_not_bundled(url: str, tmp_path: Path) -> None:
    with Ledger.open(url) as ledger:
        digest = next(ev.data["completions_digest"] for ev in ledger.read("r1") if ev.type == "SamplesRecorded")
        _sql(ledger, "DELETE FROM blobs WHERE digest = :d", d=digest)
        [problem] = ledger.verify()
    assert problem.run_id == "r1" and f"completions_digest {digest}: the blob is missing" in problem.reason
    _refused(url, ["verify"], "the blob is missing")
    out = tmp_path / "b.tar.gz"
    _refused(url, ["bundle", "r1", "-o", str(out)], f"names blob {digest}, which the ledger does not hold")
    assert not out.exists()


def test_blob_refuses_content_that_no_longer_hashes_to_its_digest(url: str) -> None:
    with Ledger.open(url) as ledger:
        digest = next(ev.data["prompt_set_digest"] for ev in ledger.read("r1") if ev.type == "EvalStarted")
        _sql(ledger, "UPDATE blobs SET data = :b WHERE digest = :d", b=b'["forged prompt"]', d=digest)
    out = _refused(url, ["blob", digest], f"blob {digest} no longer hashes to its digest")
    assert "forged prompt" not in out  # the content is not printed


def test_removing_a_runs_last_events_is_caught_by_verify_and_every_view(url: str) -> None:
    with Ledger.open(url) as ledger:
        last = ledger.stream_version("r1") - 1
        _sql(ledger, "DELETE FROM events WHERE run_id = 'r1' AND version >= :v", v=last - 1)  # EvalScored, RunCompleted
    _refused(url, ["verify"], "run r1: first bad version", f"but version {last} was signed", "events were removed")
    for args in (["status", "r1"], ["audit", "r1"], ["events", "r1"], ["replay", "r1"]):
        _refused(url, args, "events were removed")
    assert _cli(url, "status", "r2").exit_code == 0  # the other run reads as before


def test_removing_a_whole_run_is_caught(url: str) -> None:
    with Ledger.open(url) as ledger:
        _sql(ledger, "DELETE FROM events WHERE run_id = 'r2'")
        assert [p.run_id for p in ledger.verify()] == ["r2"]
    _refused(url, ["verify"], "run r2: first bad version 0: the stream holds no events", "events were removed")
    _refused(url, ["status", "r2"], "holds no events")


def test_a_changed_position_is_caught(url: str) -> None:
    with Ledger.open(url) as ledger:
        _sql(ledger, "UPDATE events SET position = 100000 WHERE run_id = 'r1' AND version = 3")
    _refused(url, ["verify"], "run r1: first bad version 4", "positions were altered")


def test_a_rechained_forgery_in_the_database_is_caught(url: str) -> None:
    with Ledger.open(url) as ledger:
        _rewrite(ledger, "r1", lambda ev: ev["data"].update(score=1.0) if ev["type"] == "EvalScored" else None)
        assert ledger.verify("r1")[0].reason.startswith("version")  # the chain is intact: the signed head is not
    _refused(url, ["verify", "r1"], "differs from its signed head", "the history before it was rewritten")
    for args in (["audit", "r1"], ["status", "r1"], ["lineage", "snapshots/r1/sampler-2", "--run", "r1"]):
        _refused(url, args, "differs from its signed head")


def test_a_view_names_a_stored_event_its_type_refuses(url: str) -> None:
    with Ledger.open(url) as ledger:
        _sql(ledger, "DELETE FROM signed_heads WHERE run_id = 'r1'")  # a forger without the key drops them
        _rewrite(ledger, "r1", lambda ev: ev["data"].pop("step") if ev["type"] == "StepCompleted" else None)
    for args in (["status", "r1"], ["audit", "r1"], ["events", "r1"]):
        _refused(url, args, "run r1 version 3 (StepCompleted) holds a payload its event type refuses: missing step")
    # replay shows the run as far as it rebuilds, beside what verify found, naming the event it stopped at
    _refused(url, ["replay", "r1"], "chain BROKEN", "StepCompleted: missing step",
             "cannot rebuild the views: run r1 version 3 (StepCompleted) cannot be read")


def test_a_team_key_signs_and_verify_trusts_it_by_file(ledger_url: str, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    team = tmp_path / "team.pem"
    made = _cli(ledger_url, "key", "--new", str(team))
    assert made.exit_code == 0 and made.output.startswith("ed25519:")
    monkeypatch.setenv("FIRETITAN_SIGNING_KEY", str(team))
    with Ledger.open(ledger_url) as ledger:
        write_run(ledger, "r1", steps=2)
        [head] = ledger.signed_heads("r1")
    assert head.public_key == made.output.split()[0]
    assert not Path(ledger_url.removeprefix("sqlite:///") + ".signing-key").exists()  # the team's key, not one of its own
    ok = _cli(ledger_url, "verify", "--trust", str(team))
    assert ok.exit_code == 0 and "run r1: vouched for by" in ok.output
    other = tmp_path / "other.pem"
    assert _cli(ledger_url, "key", "--new", str(other)).exit_code == 0
    _refused(ledger_url, ["verify", "--trust", str(other)], "no trusted key vouches for it")
    _refused(ledger_url, ["key", "--new", str(other)], "exists; a key file is never replaced")
    _refused(ledger_url, ["verify", "--trust", "ed25519:nope"], "is not an ed25519 public key")


def test_a_run_id_holding_a_secret_is_refused(ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
    from firetitan_track import LedgerError, new_event

    monkeypatch.setenv("FIREWORKS_API_KEY", "fw-secret-run-id-123")
    with pytest.raises(LedgerError, match="must not contain the value of a credential"):
        ledger.append("fw-secret-run-id-123", [new_event("RunFailed", error="x", step=0)], 0)
    assert ledger.runs() == []


def test_a_run_id_written_behind_the_ledgers_back_cannot_redraw_the_terminal(url: str) -> None:
    spoof = "\x1b[2K\rr1"  # erase the line, print "r1" over it
    with Ledger.open(url) as ledger:
        _sql(ledger, "UPDATE events SET run_id = :s WHERE run_id = 'r2'", s=spoof)
        _sql(ledger, "DELETE FROM signed_heads WHERE run_id = 'r2'")
    listed = _cli(url, "runs")
    assert listed.exit_code == 0 and "\x1b" not in listed.output and repr(spoof) in listed.output
    out = _refused(url, ["verify"], "a run id is 1-128 letters")
    assert "\x1b" not in out


def test_an_eval_id_forged_into_the_database_never_becomes_a_path(url: str, tmp_path: Path) -> None:
    target = Path("/tmp") / f"forged-{tmp_path.name}"
    with Ledger.open(url) as ledger:
        _sql(ledger, "DELETE FROM signed_heads WHERE run_id = 'r1'")  # a forger without the key drops them
        _rewrite(ledger, "r1", lambda ev: ev["data"].update(eval_id=f"../../../../{target}")
                 if "eval_id" in ev["data"] else None)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _refused(url, ["export", "mlflow", "r1", "--tracking-uri", store, "--quiet"],
             "run r1 version", "eval_id is a string", "not an id")
    assert not Path(f"{target}.json").exists()


def test_a_run_id_that_became_a_secret_is_neither_bundled_nor_exported(url: str, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FIREWORKS_API_KEY", "r2")  # a key equal to a run id recorded before it was one
    out = tmp_path / "b.tar.gz"
    assert "r2" not in _refused(url, ["bundle", "r2", "-o", str(out)], "a run id holds the value of a credential")
    assert not out.exists()
    _refused(url, ["export", "mlflow", "r2", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--quiet"],
             "a run id holds the value of a credential in this environment; it is not exported")
