"""The ledger conformance suite: every backend subclasses LedgerConformance.

A subclass provides a ``ledger_url`` fixture (an empty database at the head
schema, fresh for each test; the ``ledger`` fixture in tests/conftest.py opens
it), ``raw_contents(ledger)`` (everything the database holds, as bytes, to scan
for secrets), and may add backend-specific tests.
"""

from __future__ import annotations

import threading
import time
import pytest
import sqlalchemy as sa

from firetitan_track import (
    ConcurrencyError,
    Ledger,
    LedgerError,
    NewEvent,
    NotFound,
    new_event,
)
from firetitan_track.blobs import json_digest
from firetitan_track.ledger import FollowCursor
from firetitan_track import events as catalogue
from firetitan_track.events import InvalidEvent, UnknownEventType

SECRET = "fw_SECRETKEY_1234567890abcdef"


def step(n: int, **extra: object) -> NewEvent:
    return new_event("StepCompleted", step=n, data_cursor=n, micro_batches=1,
                     metrics={"loss": 1.0 / (n + 1), **extra}, optimizer={"lr": 1e-4})


def run_started(**extra: object) -> NewEvent:
    # spec_digest names the spec held in the event (an identity), not a stored blob
    spec = {"model": "tiny", **extra}
    return new_event("RunStarted", spec=spec, spec_digest=json_digest(spec), code_version="test", seed=0,
                     backend="local")


class LedgerConformance:
    def raw_contents(self, ledger: Ledger) -> bytes:
        raise NotImplementedError

    # -- versions ----------------------------------------------------------------

    def test_versions_are_gapless_from_zero(self, ledger: Ledger) -> None:
        first = ledger.append("r", [run_started(), step(0)], 0)
        second = ledger.append("r", [step(1)], 2)
        third = ledger.append("r", [step(2), step(3), step(4)], 3)
        assert [e.version for e in first + second + third] == list(range(6))
        assert [e.version for e in ledger.read("r")] == list(range(6))
        assert ledger.stream_version("r") == 6
        assert ledger.stream_version("never-written") == 0

    def test_read_returns_what_append_recorded(self, ledger: Ledger) -> None:
        recorded = ledger.append("r", [run_started(), step(0), step(1)], 0)
        assert ledger.read("r") == recorded
        assert ledger.read("r", from_version=1) == recorded[1:]
        assert ledger.read("r", from_version=3) == []

    def test_streams_are_independent(self, ledger: Ledger) -> None:
        ledger.append("a", [step(0)], 0)
        ledger.append("b", [step(0), step(1)], 0)
        ledger.append("a", [step(1)], 1)
        assert [e.version for e in ledger.read("a")] == [0, 1]
        assert [e.version for e in ledger.read("b")] == [0, 1]

    # -- expected-version conflicts -----------------------------------------------

    def test_stale_expected_version_raises_concurrency_error(self, ledger: Ledger) -> None:
        ledger.append("r", [step(0), step(1)], 0)
        with pytest.raises(ConcurrencyError) as info:
            ledger.append("r", [step(2)], 1)
        err = info.value
        assert (err.run_id, err.expected, err.actual) == ("r", 1, 2)
        assert "'r'" in str(err) and "1" in str(err) and "2" in str(err)
        assert ledger.stream_version("r") == 2

    def test_new_stream_must_be_appended_at_zero(self, ledger: Ledger) -> None:
        with pytest.raises(ConcurrencyError) as info:
            ledger.append("r", [step(0)], 1)
        assert (info.value.expected, info.value.actual) == (1, 0)
        assert ledger.stream_version("r") == 0

    def test_two_writers_racing_for_one_version_exactly_one_wins(self, ledger: Ledger) -> None:
        barrier = threading.Barrier(8)
        outcomes: list[str] = []

        def contend(i: int) -> None:
            event = step(0, writer=i)
            barrier.wait()
            try:
                ledger.append("contested", [event], 0)
                outcomes.append("won")
            except ConcurrencyError:
                outcomes.append("lost")

        threads = [threading.Thread(target=contend, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(outcomes) == ["lost"] * 7 + ["won"]
        assert ledger.stream_version("contested") == 1

    # -- idempotency -------------------------------------------------------------

    def test_reappending_stored_events_is_acknowledged_not_duplicated(self, ledger: Ledger) -> None:
        batch = [run_started(), step(0)]
        first = ledger.append("r", batch, 0)
        ledger.append("r", [step(1)], 2)
        again = ledger.append("r", batch, 0)  # e.g. a retry after a lost acknowledgement
        assert again == first
        assert ledger.stream_version("r") == 3
        assert ledger.settle()
        assert len(ledger.follow(0)) == 3

    def test_reappend_of_a_different_event_at_a_taken_version_conflicts(self, ledger: Ledger) -> None:
        ledger.append("r", [step(0)], 0)
        with pytest.raises(ConcurrencyError):
            ledger.append("r", [step(0)], 0)  # same content, new event id: not a retry
        assert ledger.stream_version("r") == 1

    def test_event_id_already_stored_at_another_version_is_rejected(self, ledger: Ledger) -> None:
        e = step(0)
        ledger.append("r", [e], 0)
        with pytest.raises(LedgerError, match=e.event_id):
            ledger.append("r", [step(1), e], 1)
        assert ledger.stream_version("r") == 1

    def test_batch_repeating_an_event_id_is_rejected(self, ledger: Ledger) -> None:
        e = step(0)
        with pytest.raises(InvalidEvent):
            ledger.append("r", [e, e], 0)
        assert ledger.stream_version("r") == 0

    # -- atomic batches ------------------------------------------------------------

    def test_batch_with_an_invalid_event_writes_nothing(self, ledger: Ledger) -> None:
        incomplete = NewEvent("StepCompleted", {"step": 1})
        with pytest.raises(InvalidEvent, match="missing"):
            ledger.append("r", [step(0), incomplete], 0)
        with pytest.raises(UnknownEventType):
            ledger.append("r", [step(0), NewEvent("NoSuchEvent", {})], 0)
        with pytest.raises(InvalidEvent, match="metrics is .* not an object of \\(a number\\)"):
            ledger.append("r", [step(0), NewEvent("StepCompleted", {**step(1).data, "metrics": {"loss": "1"}})], 0)
        with pytest.raises(InvalidEvent, match="not JSON"):  # a field of any JSON value, holding none
            ledger.append("r", [step(0), NewEvent("StepCompleted", {**step(1).data, "data_cursor": object()})], 0)
        assert ledger.stream_version("r") == 0
        assert ledger.follow(0) == []

    def test_batch_failing_in_the_database_writes_nothing(self, ledger: Ledger) -> None:
        stored = step(0)
        ledger.append("r", [stored], 0)
        # the duplicate id is detected by the database, after the first rows went in
        with pytest.raises(LedgerError):
            ledger.append("r", [step(1), step(2), stored], 1)
        assert [e.event_id for e in ledger.read("r")] == [stored.event_id]
        assert ledger.settle()
        assert len(ledger.follow(0)) == 1

    def test_bad_arguments_are_refused(self, ledger: Ledger) -> None:
        with pytest.raises(LedgerError):
            ledger.append("", [step(0)], 0)
        with pytest.raises(LedgerError):
            ledger.append("r", [step(0)], -1)
        assert ledger.append("r", [], 0) == []
        assert ledger.stream_version("r") == 0

    # -- reading -------------------------------------------------------------------

    def test_unknown_run_is_named(self, ledger: Ledger) -> None:
        with pytest.raises(NotFound, match="no-such-run") as info:
            ledger.read("no-such-run")
        with pytest.raises(NotFound):
            ledger.verify("no-such-run")

    def test_read_or_empty_reads_a_stream_and_gives_nothing_for_one_never_written(self, ledger: Ledger) -> None:
        recorded = ledger.append("r", [run_started(), step(0)], 0)
        assert ledger.read_or_empty("r") == recorded
        assert ledger.read_or_empty("never-written") == []

    def test_runs_lists_each_stream(self, ledger: Ledger) -> None:
        ledger.append("a", [run_started(), step(0)], 0)
        ledger.append("b", [run_started()], 0)
        info = {r.run_id: r for r in ledger.runs()}
        assert set(info) == {"a", "b"}
        assert (info["a"].events, info["a"].last_type) == (2, "StepCompleted")
        assert (info["b"].events, info["b"].last_type) == (1, "RunStarted")
        assert info["a"].first_at <= info["a"].last_at

    # -- positions and following ---------------------------------------------------------

    def test_positions_increase_across_streams(self, ledger: Ledger) -> None:
        ledger.append("a", [step(0)], 0)
        ledger.append("b", [step(0), step(1)], 0)
        ledger.append("a", [step(1)], 1)
        assert ledger.settle()  # a follower reads what has settled (PostgreSQL: see store.py)
        followed = ledger.follow(0)
        positions = [e.position for e in followed]
        assert positions == sorted(positions) and len(set(positions)) == 4
        assert [(e.run_id, e.version) for e in followed] == [("a", 0), ("b", 0), ("b", 1), ("a", 1)]

    def test_follow_pages_after_a_cursor_and_filters_runs(self, ledger: Ledger) -> None:
        for i in range(5):
            ledger.append("a" if i % 2 else "b", [step(i)], i // 2 if i % 2 == 0 else (i - 1) // 2)
        assert ledger.settle()
        everything = ledger.follow(0)
        first = ledger.follow(0, limit=2)
        assert first == everything[:2]
        second = ledger.follow(first.cursor, limit=2)
        assert second == everything[2:4] and second.cursor > first.cursor
        last = ledger.follow(second.cursor)
        assert last == everything[4:]
        end = ledger.follow(last.cursor)
        assert end == [] and end.cursor == last.cursor == everything.cursor
        assert [e.run_id for e in ledger.follow(0, run_ids=["a"])] == ["a", "a"]

    def test_a_cursor_survives_as_a_checkpoint(self, ledger: Ledger) -> None:
        ledger.append("a", [step(0), step(1)], 0)
        assert ledger.settle()
        first = ledger.follow(0)
        ledger.set_checkpoint("f", first.cursor)
        ledger.append("a", [step(2)], 2)
        assert ledger.settle()
        assert ledger.get_checkpoint("f") == first.cursor
        assert [e.version for e in ledger.follow(ledger.get_checkpoint("f"))] == [2]

    def test_concurrent_writers_lose_nothing_while_a_follower_reads(self, ledger: Ledger) -> None:
        # 8 writers, 320 appends; three runs are shared by all writers (losers of
        # each expected-version race re-read the version and retry), plus one
        # private run each. A follower pages through positions meanwhile.
        writers, appends_each = 8, 40
        shared = ["shared-0", "shared-1", "shared-2"]
        acknowledged: list[str] = []
        failures: list[BaseException] = []
        writing_done = threading.Event()
        seen = []

        def write(i: int) -> None:
            try:
                for k in range(appends_each):
                    run = f"own-{i}" if k % 4 == 0 else shared[k % 3]
                    event = step(k, writer=i)
                    while True:
                        try:
                            ledger.append(run, [event], ledger.stream_version(run))
                            break
                        except ConcurrencyError:
                            continue
                    acknowledged.append(event.event_id)
            except BaseException as e:  # surfaced by the assertion below
                failures.append(e)

        def follow() -> None:
            cursor = FollowCursor()
            while True:
                finished = writing_done.is_set()  # read before polling: then a drain is complete
                if finished:
                    assert ledger.settle()
                batch = ledger.follow(cursor, limit=25)
                seen.extend(batch)
                cursor = batch.cursor
                if batch:
                    continue
                if finished:
                    return
                else:
                    time.sleep(0.002)

        follower = threading.Thread(target=follow)
        follower.start()
        threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        writing_done.set()
        follower.join()

        assert failures == []
        assert len(acknowledged) == writers * appends_each
        assert len({e.position for e in seen}) == len(seen), "an event seen twice"
        assert seen == ledger.follow(0, limit=10_000), "the follower skipped an event"
        assert sorted(e.event_id for e in seen) == sorted(acknowledged)
        for run in shared + [f"own-{i}" for i in range(writers)]:
            versions = list(range(ledger.stream_version(run)))
            assert [e.version for e in ledger.read(run)] == versions
            assert [e.version for e in seen if e.run_id == run] == versions, "a stream followed out of order"
        assert ledger.verify() == []

    def test_a_commit_watch_wakes_on_a_commit_from_another_connection(self, ledger: Ledger,
                                                                    ledger_url: str) -> None:
        """A follower waits on the watch instead of polling: quiet while nothing commits,
        woken by an append made through another connection (another process's ledger)."""
        watch = ledger.watch_commits()
        try:
            assert watch.wait(0.0) is True, "the first wait reads what committed before the watch began"
            assert watch.wait(0.3) is False, "woken with nothing committed"
            writer = Ledger.open(ledger_url)
            try:
                timer = threading.Timer(0.2, lambda: writer.append("r", [step(0)], 0))
                timer.start()
                seen: list = []
                while not seen:  # a follower's loop: every wake is followed by a read
                    assert watch.wait(30.0) is True, "no wake within 30 s of a commit"
                    seen = ledger.follow(0)
                    # (on PostgreSQL another session's transaction may hold the append back
                    # from followers for a moment; that transaction's end notifies no one)
                    seen = seen or (ledger.settle() and ledger.follow(0))
                timer.join()
            finally:
                writer.close()
            assert [e.run_id for e in seen] == ["r"]
            stop = threading.Event()
            stop.set()
            watch.wait_or_stop(stop, poll_s=30.0)  # returns at once once stopped
        finally:
            watch.close()

    def test_a_team_key_signs_a_runs_end_with_its_events(self, ledger_url: str, tmp_path,  # type: ignore[no-untyped-def]
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
        """The head a run's last event makes is signed by the team's key, written with the events
        (on PostgreSQL, inside the append's pipelined transaction), and verify checks it."""
        from firetitan_track.signing import new_key_file

        key = new_key_file(tmp_path / "team.pem")
        monkeypatch.setenv("FIRETITAN_SIGNING_KEY", str(tmp_path / "team.pem"))
        with Ledger.open(ledger_url) as ledger:
            recorded = ledger.append("r", [run_started(), step(0)], 0)
            assert ledger.signed_heads("r") == [], "a head is signed at a run's end, not before"
            recorded += ledger.append("r", [new_event("RunCompleted", final_step=1, final_snapshot=None)], 2)
            [head] = ledger.signed_heads("r")
            assert (head.version, head.hash) == (2, recorded[-1].hash) and head.valid()
            assert head.public_key == key.sign("r", 0, "x").public_key
            assert ledger.verify() == []

    # -- tamper evidence -------------------------------------------------------------

    def _three_events(self, ledger: Ledger) -> None:
        ledger.append("r", [run_started(), step(0), step(1), step(2)], 0)
        ledger.append("other", [run_started()], 0)

    def test_verify_reports_an_intact_ledger_as_intact(self, ledger: Ledger) -> None:
        self._three_events(ledger)
        ledger.append("r", [new_event("EvalStarted", eval_id="e", step=2, snapshot_path="s",
                                      prompt_set_digest=ledger.put_json(["q1", "q2"]),
                                      prompt_count=2, sampling={})], 4)
        assert ledger.verify() == []
        assert ledger.verify("r") == []

    def test_verify_detects_an_edited_payload(self, ledger: Ledger) -> None:
        self._three_events(ledger)
        self._sql(ledger, "UPDATE events SET data = replace(data, :old, :new) "
                          "WHERE run_id = 'r' AND version = 2", old='"step":1', new='"step":7')
        problems = ledger.verify()
        assert [(p.run_id, p.version) for p in problems] == [("r", 2)]
        assert ledger.verify("other") == []

    def test_verify_detects_a_deleted_event(self, ledger: Ledger) -> None:
        self._three_events(ledger)
        self._sql(ledger, "DELETE FROM events WHERE run_id = 'r' AND version = 1")
        assert [(p.run_id, p.version) for p in ledger.verify()] == [("r", 1)]

    def test_verify_detects_a_deleted_event_with_the_stream_renumbered(self, ledger: Ledger) -> None:
        self._three_events(ledger)
        self._sql(ledger, "DELETE FROM events WHERE run_id = 'r' AND version = 1")
        for v in (2, 3):
            self._sql(ledger, f"UPDATE events SET version = {v - 1} WHERE run_id = 'r' AND version = {v}")
        assert [(p.run_id, p.version) for p in ledger.verify()] == [("r", 1)]

    def test_verify_detects_reordered_events(self, ledger: Ledger) -> None:
        self._three_events(ledger)
        self._sql(ledger, "UPDATE events SET version = -1 WHERE run_id = 'r' AND version = 1")
        self._sql(ledger, "UPDATE events SET version = 1 WHERE run_id = 'r' AND version = 2")
        self._sql(ledger, "UPDATE events SET version = 2 WHERE run_id = 'r' AND version = -1")
        assert [(p.run_id, p.version) for p in ledger.verify("r")] == [("r", 1)]

    def test_verify_detects_a_writing_transaction_moved_out_of_version_order(self, ledger: Ledger) -> None:
        """A follower reads a stream in (xid, position) order: a stream whose xids no longer grow
        with its versions would be followed out of order."""
        self._three_events(ledger)
        self._sql(ledger, "UPDATE events SET xid = xid + 1000 WHERE run_id = 'r' AND version = 1")
        assert [(p.run_id, p.version) for p in ledger.verify()] == [("r", 2)]

    def test_verify_detects_an_edited_blob(self, ledger: Ledger) -> None:
        self._three_events(ledger)
        digest = ledger.put_json(["prompt one", "prompt two"])
        ledger.append("r", [new_event("EvalStarted", eval_id="e", step=2, snapshot_path="s",
                                      prompt_set_digest=digest, prompt_count=2, sampling={})], 4)
        self._sql(ledger, f"UPDATE blobs SET data = :d WHERE digest = '{digest}'",
                  d=b'["prompt one","a different prompt"]')
        problems = ledger.verify()
        assert [(p.run_id, p.version) for p in problems] == [("r", 4)]
        assert digest in problems[0].reason and "prompt_set_digest" in problems[0].reason

    def test_verify_accepts_a_digest_of_inline_content(self, ledger: Ledger) -> None:
        # RunStarted.spec_digest hashes the spec held in the event, not a stored blob
        ledger.append("r", [new_event("RunStarted", spec={}, spec_digest="ab" * 32, code_version="t",
                                      seed=0, backend="local")], 0)
        assert ledger.verify() == []

    @staticmethod
    def _sql(ledger: Ledger, statement: str, **params: object) -> None:
        with ledger.engine.begin() as conn:
            conn.execute(sa.text(statement), params)

    # -- upcasting -------------------------------------------------------------------

    def test_old_schema_versions_are_upcast_on_read_and_never_rewritten(
            self, ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setitem(catalogue.CATALOGUE, "Renamed",
                            catalogue.EventType("Renamed", 3, ("score_pct",)))
        monkeypatch.setitem(catalogue._UPCASTERS, ("Renamed", 1),
                            lambda d: {"score": d.pop("value"), **d})
        monkeypatch.setitem(catalogue._UPCASTERS, ("Renamed", 2),
                            lambda d: {"score_pct": d.pop("score") * 100, **d})
        old = NewEvent("Renamed", {"value": 0.5}, schema_version=1)  # written by an older tool
        ledger.append("r", [old, NewEvent("Renamed", {"score_pct": 7})], 0)
        first, second = ledger.read("r")
        assert (first.schema_version, first.data) == (3, {"score_pct": 50.0})
        assert (second.schema_version, second.data) == (3, {"score_pct": 7})
        with ledger.engine.connect() as conn:
            stored = conn.execute(sa.text("SELECT schema_version, data FROM events WHERE version = 0")).one()
        assert (stored.schema_version, stored.data) == (1, '{"value":0.5}')
        assert ledger.verify() == []

    # -- blobs -------------------------------------------------------------------------

    def test_blob_round_trip_and_dedup(self, ledger: Ledger) -> None:
        data = bytes(range(256)) * 10
        digest = ledger.put_blob(data, "application/x-test")
        assert ledger.put_blob(data) == digest
        assert ledger.get_blob(digest) == data
        with ledger.engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT media_type, size FROM blobs")).all()
        assert [tuple(r) for r in rows] == [("application/x-test", 2560)]

    def test_json_blobs_are_canonical(self, ledger: Ledger) -> None:
        a = ledger.put_json({"b": [1, 2], "a": "é"})
        assert ledger.put_json({"a": "é", "b": [1, 2]}) == a
        assert ledger.get_json(a) == {"a": "é", "b": [1, 2]}
        assert ledger.get_blob(a) == '{"a":"é","b":[1,2]}'.encode()

    def test_unknown_blob_is_named(self, ledger: Ledger) -> None:
        with pytest.raises(LedgerError, match="f" * 64):
            ledger.get_blob("f" * 64)

    # -- checkpoints ---------------------------------------------------------------------

    def test_checkpoints_start_at_the_beginning_and_persist(self, ledger: Ledger) -> None:
        assert ledger.get_checkpoint("mlflow") == FollowCursor(0, 0)
        ledger.set_checkpoint("mlflow", FollowCursor(7, 12))
        ledger.set_checkpoint("mlflow", FollowCursor(9, 40))
        ledger.set_checkpoint("audit", 3)  # a position alone
        assert (ledger.get_checkpoint("mlflow"), ledger.get_checkpoint("audit")) == (FollowCursor(9, 40),
                                                                                      FollowCursor(0, 3))

    # -- secrets -----------------------------------------------------------------------

    def test_secrets_never_reach_the_database(self, ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("FIREWORKS_API_KEY", SECRET)
        ledger.append("r", [
            run_started(api_key=SECRET, apiKey="other-secret-value",
                        headers={"Authorization": f"Bearer {SECRET}"},
                        note=f"called with key {SECRET} today", nested=[{"access_token": "tok-abcdefgh"}]),
            new_event("RunFailed", error=f"401 for key={SECRET}", step=0),
        ], 0)
        ledger.put_blob(f"log line: FIREWORKS_API_KEY={SECRET}\n".encode())
        ledger.put_json({"client": {"FIREWORKS_API_KEY": SECRET, "password": "hunter2hunter2"}})
        raw = self.raw_contents(ledger)
        for secret in (SECRET, "other-secret-value", "tok-abcdefgh", "hunter2hunter2"):
            assert secret.encode() not in raw, f"{secret} reached the database"
        spec = ledger.read("r")[0].data["spec"]
        assert spec["api_key"] == spec["apiKey"] == "***"
        assert spec["note"] == "called with key *** today"
        assert spec["model"] == "tiny"  # ordinary fields untouched
        assert ledger.verify() == []
