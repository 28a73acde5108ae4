"""A relative store URL names one store for the life of a process, whatever directory it
moves to afterwards: the text is resolved where it is read (command line, environment,
default), so no cache keyed by it (SQLAlchemy's pool, MLflow's store map) can point a
later write at another directory's store."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from firetitan_track import Ledger
from firetitan_track.events import new_event
from firetitan_track.urls import absolute_url, default_ledger_url


@pytest.mark.parametrize("url, expected", [
    ("sqlite:///rel/ledger.db", "sqlite:///{cwd}/rel/ledger.db"),
    ("sqlite+pysqlite:///l.db?timeout=5", "sqlite+pysqlite:///{cwd}/l.db?timeout=5"),
    ("sqlite:////abs/ledger.db", "sqlite:////abs/ledger.db"),
    ("sqlite://", "sqlite://"),
    ("sqlite:///:memory:", "sqlite:///:memory:"),
    ("postgresql+psycopg://u@h/db", "postgresql+psycopg://u@h/db"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
])
def test_only_a_relative_sqlite_path_changes(url: str, expected: str, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert absolute_url(url) == expected.format(cwd=tmp_path)


def test_a_ledger_opened_by_a_relative_url_keeps_its_file_after_a_chdir(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir(), second.mkdir()
    monkeypatch.chdir(first)
    ledger = Ledger.open("sqlite:///rel.db")
    ledger.append("r", [new_event("RunFailed", error="x", step=0)], expected_version=0)
    monkeypatch.chdir(second)
    ledger.engine.dispose()  # the next write opens a new connection, from the new directory
    ledger.append("r", [new_event("RunFailed", error="y", step=0)], expected_version=1)
    ledger.close()
    assert not (second / "rel.db").exists()
    with Ledger.open(f"sqlite:///{first / 'rel.db'}", create=False) as again:
        assert again.stream_version("r") == 2


def test_the_default_ledger_is_the_current_directorys_when_it_is_read(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FIRETITAN_LEDGER", raising=False)
    monkeypatch.chdir(tmp_path)
    assert default_ledger_url() == f"sqlite:///{tmp_path}/.firetitan/ledger.db"
    monkeypatch.setenv("FIRETITAN_LEDGER", "sqlite:///team.db")
    assert default_ledger_url() == f"sqlite:///{tmp_path}/team.db"


def test_the_ledger_option_is_resolved_as_the_command_line_is_read(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from runner.cli import main

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["--ledger", "sqlite:///here.db", "db", "upgrade"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "here.db").exists()


def test_the_default_mlflow_store_follows_the_directory_each_export_starts_in(
        ledger: Ledger, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two exports to the default store from two directories, in one process: each
    directory gets its own store (MLflow's store cache would otherwise send the second
    to the first directory's)."""
    from firetitan_track.projections.mlflow import export_mlflow
    from tests.projections.streams import write_run

    write_run(ledger, "r1", steps=2)
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir(), second.mkdir()
    monkeypatch.chdir(first)
    export_mlflow(ledger, artifacts=False)
    monkeypatch.chdir(second)
    report = export_mlflow(ledger, artifacts=False)
    assert report.runs == ["r1"], "the second directory's store is new: the run is exported to it"
    assert (first / ".firetitan" / "mlflow.db").exists() and (second / ".firetitan" / "mlflow.db").exists()
