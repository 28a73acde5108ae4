"""What the store's own failures look like: a damaged payload, a write the disk refuses,
an empty file, a non-finite number, a digest prefix. Each is a message naming the
ledger and what to do, never a raw database or JSON traceback."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from firetitan_track import Ledger, new_event
from firetitan_track.events import InvalidEvent
from firetitan_track.ledger import CorruptLedger, StoreFailure
from runner.cli import main


def invoke(url: str, *args: str) -> Result:
    return CliRunner().invoke(main, ["--ledger", url, *args])


def started(run_id: str = "r"):  # noqa: ANN201
    return new_event("RunStarted", spec={"run": {"name": run_id}}, spec_digest="0" * 64, code_version="t",
                     seed=0, backend="local")


def test_a_damaged_payload_is_named_with_the_ledger_and_verify(ledger: Ledger, ledger_url: str) -> None:
    ledger.append("r", [started(), new_event("RunFailed", error="boom", step=0)], 0)
    path = ledger_url.removeprefix("sqlite:///")
    with sqlite3.connect(path) as db:  # what a stray edit or a torn disk leaves behind
        db.execute("UPDATE events SET data = '{\"error\": \"bo' WHERE version = 1")
    with pytest.raises(CorruptLedger, match=rf"the ledger at .*{Path(path).name} is damaged: run r version 1 "
                                            r"\(RunFailed\).*firetitan-track verify"):
        ledger.read("r")
    for command in (["events", "r"], ["events", "r", "--json"], ["status", "r"], ["audit", "r"]):
        result = invoke(ledger_url, *command)
        assert result.exit_code == 1, (command, result.output)
        assert "is damaged" in result.output and "firetitan-track verify" in result.output, command
        assert "Traceback" not in result.output and "JSONDecodeError" not in result.output
    assert "first bad version 1" in invoke(ledger_url, "verify").output


def test_a_write_the_disk_refuses_is_a_message_naming_the_ledger(tmp_path: Path) -> None:
    # A real refused write: the process may not grow a file past RLIMIT_FSIZE (as root,
    # permissions would not stop it).
    path = tmp_path / "ledger.db"
    script = textwrap.dedent(f"""
        import os, resource, signal
        from firetitan_track import Ledger, new_event
        ledger = Ledger.open("sqlite:///{path}")
        ledger.append("r", [new_event("RunFailed", error="x", step=0)], expected_version=0)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        size = max(os.path.getsize(p) for p in ("{path}", "{path}-wal") if os.path.exists(p))
        resource.setrlimit(resource.RLIMIT_FSIZE, (size + 8192, size + 8192))
        ledger.append("r", [new_event("RunFailed", error="y" * 200_000, step=0)], expected_version=1)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert f"StoreFailure: cannot write to the ledger at sqlite:///{path}: disk I/O error" in proc.stderr
    assert Ledger.open(f"sqlite:///{path}").stream_version("r") == 1  # nothing half-written


def test_reading_commands_leave_an_empty_file_alone(tmp_path: Path) -> None:
    empty = tmp_path / "empty.db"
    empty.touch()
    for command in (["runs"], ["events", "x"], ["status", "x"], ["verify"]):
        result = invoke(f"sqlite:///{empty}", *command)
        assert result.exit_code == 1 and f"no ledger at {empty} (the file is empty)" in result.output, command
    assert empty.stat().st_size == 0


def test_a_non_finite_number_never_reaches_the_ledger(ledger: Ledger) -> None:
    for bad in (float("nan"), float("inf"), -float("inf")):
        event = new_event("StepCompleted", step=1, data_cursor=None, micro_batches=1,
                          metrics={"loss": bad}, optimizer={"learning_rate": 1e-3})
        with pytest.raises(InvalidEvent, match=rf"StepCompleted: metrics\.loss is {bad}, not a finite number"):
            ledger.append("r", [event], 0)
    ledger.append("r", [new_event("RunFailed", error="a NaN in a message is only text", step=0)], 0)
    assert ledger.stream_version("r") == 1


def test_blob_takes_the_digest_prefix_that_audit_prints(ledger: Ledger, ledger_url: str) -> None:
    digest = ledger.put_json([{"prompt": "reverse 12", "answer": "21"}])
    assert ledger.get_blob(digest[:12]) == ledger.get_blob(digest)
    result = invoke(ledger_url, "blob", digest[:12])
    assert result.exit_code == 0 and result.output == ledger.get_blob(digest).decode()
    missing = invoke(ledger_url, "blob", "ffffffffffff" if not digest.startswith("ffff") else "000000000000")
    assert missing.exit_code == 1 and "no blob whose digest starts with" in missing.output


def test_a_non_finite_number_never_reaches_a_blob(ledger: Ledger) -> None:
    import sqlalchemy as sa

    with pytest.raises(InvalidEvent, match=r"a JSON blob: 1\.score is nan, not a finite number"):
        ledger.put_json([{"score": 1.0}, {"score": float("nan")}])
    with ledger.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT COUNT(*) FROM blobs")).scalar() == 0
