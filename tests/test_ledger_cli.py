"""The ledger commands, driven in-process through click's CliRunner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result

from firetitan_track import Ledger, new_event
from runner.cli import main
from firetitan_track.store import HEAD_REVISION


def invoke(url: str, *args: str) -> Result:
    return CliRunner().invoke(main, ["--ledger", url, *args])


def step(n: int):  # noqa: ANN201
    return new_event("StepCompleted", step=n, data_cursor=n, micro_batches=1,
                     metrics={"loss": 0.5}, optimizer={})


@pytest.fixture
def filled(ledger: Ledger, ledger_url: str) -> str:
    ledger.append("run-a", [step(0), step(1)], 0)
    ledger.append("run-b", [step(0)], 0)
    return ledger_url


def test_runs_lists_runs_as_a_table_and_as_json(filled: str) -> None:
    table = invoke(filled, "runs")
    assert table.exit_code == 0, table.output
    assert "run-a" in table.output and "run-b" in table.output and "StepCompleted" in table.output
    listed = json.loads(invoke(filled, "runs", "--json").output)
    assert [(r["run_id"], r["events"]) for r in listed] == [("run-a", 2), ("run-b", 1)]


def test_events_shows_a_run_in_order(filled: str) -> None:
    result = invoke(filled, "events", "run-a", "--json")
    assert result.exit_code == 0, result.output
    assert [(e["version"], e["type"]) for e in json.loads(result.output)] == [
        (0, "StepCompleted"), (1, "StepCompleted")]
    table = invoke(filled, "events", "run-a")
    assert table.exit_code == 0 and "VERSION" in table.output and '"data_cursor": 1' in table.output


def test_events_of_an_unknown_run_fails_naming_it(filled: str) -> None:
    result = invoke(filled, "events", "no-such-run")
    assert result.exit_code != 0
    assert "no-such-run" in result.output


def test_verify_says_intact_and_exits_zero(filled: str) -> None:
    result = invoke(filled, "verify")
    assert (result.exit_code, result.output.strip()) == (0, "intact")
    assert invoke(filled, "verify", "run-a").exit_code == 0


def test_verify_exits_one_naming_run_and_first_bad_version(filled: str, ledger: Ledger) -> None:
    with ledger.engine.begin() as conn:
        conn.execute(sa.text("UPDATE events SET data = :d WHERE run_id = 'run-a' AND version = 1"),
                     {"d": '{"step":9}'})
    result = invoke(filled, "verify")
    assert result.exit_code == 1
    assert "run run-a: first bad version 1" in result.output
    assert invoke(filled, "verify", "run-b").exit_code == 0


def test_blob_writes_the_exact_bytes(ledger: Ledger, ledger_url: str) -> None:
    data = b"\x00\xffbinary\n"
    digest = ledger.put_blob(data)
    result = CliRunner().invoke(main, ["--ledger", ledger_url, "blob", digest])
    assert result.exit_code == 0
    assert result.stdout_bytes == data
    missing = invoke(ledger_url, "blob", "0" * 64)
    assert missing.exit_code != 0 and "0" * 64 in missing.output


@pytest.mark.parametrize("command", [["runs"], ["events", "r"], ["verify"], ["blob", "0" * 64],
                                     ["db", "current"]])
def test_reading_a_missing_ledger_says_so_and_creates_nothing(tmp_path: Path, command: list[str]) -> None:
    path = tmp_path / "nowhere" / "ledger.db"
    result = invoke(f"sqlite:///{path}", *command)
    assert result.exit_code != 0
    assert f"no ledger at {path}" in result.output
    assert not path.parent.exists()


def test_ledger_url_comes_from_the_environment_then_the_default(
        filled: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FIRETITAN_LEDGER", filled)
    assert "run-a" in CliRunner().invoke(main, ["runs"]).output
    monkeypatch.delenv("FIRETITAN_LEDGER")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["runs"])
    # the default, resolved against the directory the command runs in
    assert result.exit_code != 0 and f"no ledger at {tmp_path}/.firetitan/ledger.db" in result.output


def test_db_upgrade_then_current(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'new' / 'ledger.db'}"
    first = invoke(url, "db", "upgrade")
    assert first.exit_code == 0 and f"to {HEAD_REVISION}" in first.output
    assert "already at head" in invoke(url, "db", "upgrade").output
    current = invoke(url, "db", "current")
    assert (current.exit_code, current.output.strip()) == (0, f"{HEAD_REVISION} (head)")


def test_bad_urls_exit_non_zero_with_a_clear_message(tmp_path: Path) -> None:
    result = invoke("mysql://u@h/db", "runs")
    assert result.exit_code != 0 and "unsupported ledger URL" in result.output
    result = invoke("postgresql+psycopg://u:topsecret@127.0.0.1:1/x", "db", "upgrade")
    assert result.exit_code != 0 and "cannot reach" in result.output and "topsecret" not in result.output
