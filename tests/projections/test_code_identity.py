"""Which code produced a run: a researcher's loop script, recorded with ``track()`` from a
temporary git repository (and from a folder outside any), diffed, audited, bundled and
exported. The script builds the real SDK's service and tracks it; it trains nothing, since
what is checked is the record of its code, made when ``track()`` starts the run."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from firetitan_track import Ledger
from runner.cli import main
from tests.projections.streams import write_run

LOOP = '''\
import os

from fireworks.training.sdk import FiretitanServiceClient
from firetitan_track import track

import reward

service = FiretitanServiceClient.from_firetitan_config(
    api_key="local", base_url="http://127.0.0.1:9", base_model="local/tiny-qwen3", lora_rank=0,
    training_shape_id="accounts/fireworks/trainingShapes/ts-local-tiny", deployment_id="code-id")
service = track(service, run_id=os.environ["RUN_ID"])
print(reward.score("321", "321"))
service.close()
'''

REWARD = '''\
def score(answer, expected):
    return float(answer == expected)
'''


def _git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True,
                          env=env).stdout.strip()


def _program(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "loop.py").write_text(LOOP)
    (folder / "reward.py").write_text(REWARD)
    return folder


def _track(folder: Path, run_id: str, ledger_url: str, monkeypatch: pytest.MonkeyPatch,
           argv: tuple[str, ...] = ()) -> None:
    """``python loop.py [ARGV]`` in ``folder``, in this process (its imports are warm): the
    script is __main__, its folder first on the path."""
    with monkeypatch.context() as m:
        m.chdir(folder)
        m.setenv("RUN_ID", run_id)
        m.setenv("FIRETITAN_LEDGER", ledger_url)
        m.setattr(sys, "argv", ["loop.py", *argv])
        m.setattr(sys, "path", [str(folder), *sys.path])
        sys.modules.pop("reward", None)  # each run imports the program's own module afresh
        try:
            runpy.run_path("loop.py", run_name="__main__")
        finally:
            sys.modules.pop("reward", None)


def _code(ledger_url: str, run_id: str) -> dict[str, Any]:
    with Ledger.open(ledger_url) as ledger:
        return ledger.read(run_id)[0].data["code"]


def _cli(ledger_url: str, *args: str) -> Any:
    result = CliRunner().invoke(main, ["--ledger", ledger_url, *args])
    assert result.exit_code == 0, result.output
    return result.output


def _diff(ledger_url: str, a: str, b: str) -> tuple[dict[str, Any], str]:
    return json.loads(_cli(ledger_url, "diff", a, b, "--json")), _cli(ledger_url, "diff", a, b)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    repo = _program(tmp_path / "project")
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "commit", "-qm", "the loop")
    return repo


def test_a_loop_recorded_twice_diffs_as_dirty_then_as_two_commits(repo: Path, ledger_url: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    first_commit = _git(repo, "rev-parse", "HEAD")
    _track(repo, "clean", ledger_url, monkeypatch)
    code = _code(ledger_url, "clean")
    assert code["git"]["commit"] == first_commit and code["git"]["dirty"] is False
    assert code["entry"]["path"] == "loop.py" and code["argv"] == ["loop.py"]
    assert {"fireworks-ai", "torch"} <= set(code["packages"]) and code["python"]

    # an uncommitted one-line change: the same commit, dirty, loop.py named
    edited = LOOP.replace('print(reward.score("321", "321"))', 'print(2 * reward.score("321", "321"))')
    (repo / "loop.py").write_text(edited)
    _track(repo, "edited", ledger_url, monkeypatch)
    d, text = _diff(ledger_url, "clean", "edited")
    assert d["identical"] is False and d["code"]["same"] is False
    assert d["code"]["a"]["commit"] == d["code"]["b"]["commit"] == first_commit
    assert d["code"]["differences"]["dirty"] == {"a": False, "b": True}
    assert d["code"]["differences"]["files"] == ["loop.py"]
    assert "commit" not in d["code"]["differences"]
    line = next(line for line in text.splitlines() if line.startswith("code"))
    assert f"commit {first_commit[:12]} in both" in line and "dirty" in line and "loop.py differs" in line
    # the uncommitted diff is a blob in the ledger, and `blob` shows it
    git = _code(ledger_url, "edited")["git"]
    patch = _cli(ledger_url, "blob", git["diff_digest"])
    assert "+print(2 * reward.score" in patch and "-print(reward.score" in patch
    assert git["changed"] == {"loop.py": _sha256(repo / "loop.py")}

    # committed: two commits, nothing uncommitted
    _git(repo, "commit", "-qam", "double the score")
    second_commit = _git(repo, "rev-parse", "HEAD")
    _track(repo, "committed", ledger_url, monkeypatch)
    d, text = _diff(ledger_url, "edited", "committed")
    assert d["code"]["differences"]["commit"] == {"a": first_commit, "b": second_commit}
    assert d["code"]["differences"]["dirty"] == {"a": True, "b": False}
    assert "entry" not in d["code"]["differences"]  # the script that ran is the same text
    assert f"commit {first_commit[:12]} -> {second_commit[:12]}" in text

    # an unchanged tree, the same command: nothing differs
    _track(repo, "again", ledger_url, monkeypatch)
    d, text = _diff(ledger_url, "committed", "again")
    assert d["identical"] is True and d["code"] == {**d["code"], "same": True, "differences": {}}
    assert "do not differ" in text

    # audit names the commit, and the diff behind a dirty run
    assert f"code: commit {second_commit} (clean)" in _cli(ledger_url, "audit", "again")
    audited = _cli(ledger_url, "audit", "edited")
    assert f"code: commit {first_commit} + uncommitted changes to 1 file(s) (diff {git['diff_digest'][:12]}" in audited


def test_a_loop_outside_any_repository_records_the_digests_of_its_files(tmp_path: Path, ledger_url: str,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _program(tmp_path / "loose")
    assert subprocess.run(["git", "-C", str(folder), "rev-parse"], capture_output=True).returncode != 0
    _track(folder, "loose-a", ledger_url, monkeypatch)
    code = _code(ledger_url, "loose-a")
    assert code["git"] is None and code["no_git"] == "not in a git repository"
    assert code["files"] == {"loop.py": _sha256(folder / "loop.py"), "reward.py": _sha256(folder / "reward.py")}
    assert code["entry"] == {"path": "loop.py", "digest": _sha256(folder / "loop.py")}
    assert "code: not in a git repository; 2 file(s) by digest" in _cli(ledger_url, "audit", "loose-a")

    (folder / "reward.py").write_text(REWARD.replace("float(", "0.5 * float("))
    _track(folder, "loose-b", ledger_url, monkeypatch)
    d, text = _diff(ledger_url, "loose-a", "loose-b")
    assert d["code"]["differences"] == {"files": ["reward.py"]}
    assert "not in a git repository in both; reward.py differs" in text


def test_secrets_in_the_uncommitted_diff_and_the_command_line_are_masked(repo: Path, ledger_url: str,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    env_key = "fw_ENV_secret_5b1c0d77"
    monkeypatch.setenv("FIREWORKS_API_KEY", env_key)
    (repo / "loop.py").write_text(LOOP + f'API_KEY = "fw_literal_9e8d7c6b5a"\nBACKUP = "{env_key}"\n')
    _track(repo, "secret", ledger_url, monkeypatch, argv=("--api-key", "fw_on_the_command_line_123"))
    code = _code(ledger_url, "secret")
    with Ledger.open(ledger_url) as ledger:
        stored = ledger.get_blob(code["git"]["diff_digest"])
    assert b"fw_literal_9e8d7c6b5a" not in stored and env_key.encode() not in stored
    assert b'+API_KEY = "***"' in stored
    assert code["argv"] == ["loop.py", "--api-key", "***"]


def test_a_bundle_carries_the_diff_and_mlflow_shows_the_commit(repo: Path, ledger_url: str, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch, mlflow_server: str,
                                                               client: Any, experiment: str) -> None:
    (repo / "reward.py").write_text(REWARD + "# tuned\n")
    _track(repo, "dirty", ledger_url, monkeypatch)
    git = _code(ledger_url, "dirty")["git"]
    with Ledger.open(ledger_url) as ledger:
        diff = ledger.get_blob(git["diff_digest"])

    out = tmp_path / "dirty.tar.gz"
    _cli(ledger_url, "bundle", "dirty", "-o", str(out))
    other = f"sqlite:///{tmp_path / 'other.db'}"
    _cli(other, "import", str(out))
    with Ledger.open(other) as imported:
        assert imported.get_blob(git["diff_digest"]) == diff
    _cli(other, "verify")  # chains and blob digests, the diff's included

    _cli(ledger_url, "export", "mlflow", "dirty", "--tracking-uri", mlflow_server, "--experiment", experiment)
    exp = client.get_experiment_by_name(experiment)
    [run] = client.search_runs([exp.experiment_id], "tags.ledger_run_id = 'dirty'")
    tags = run.data.tags
    assert tags["mlflow.source.git.commit"] == git["commit"] and tags["git_dirty"] == "true"
    assert tags["mlflow.source.name"] == "loop.py"
    assert Path(client.download_artifacts(run.info.run_id, "code/diff.patch", str(tmp_path))).read_bytes() == diff
    identity = json.loads(Path(client.download_artifacts(run.info.run_id, "code/identity.json",
                                                          str(tmp_path))).read_text())
    assert identity["git"]["commit"] == git["commit"] and identity["entry"]["path"] == "loop.py"


def test_runs_recorded_before_code_identity_still_read(ledger: Ledger, ledger_url: str, repo: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    write_run(ledger, "old", steps=2)  # RunStarted with code_version only, as older ledgers hold
    _track(repo, "new", ledger_url, monkeypatch)
    assert "code: not recorded (firetitan-track abc123)" in _cli(ledger_url, "audit", "old")
    d, text = _diff(ledger_url, "old", "new")
    assert d["code"]["same"] is False and d["code"]["differences"]["recorded"] == {"a": False, "b": True}
    assert "recorded only for b" in text
    d, text = _diff(ledger_url, "old", "old")
    assert d["code"]["same"] is True and "do not differ" in text


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()
