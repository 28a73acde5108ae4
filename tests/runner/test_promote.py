"""Promotion: a snapshot becomes a model through the SDK's promote_checkpoint, and the run's
record says which snapshot, which eval justified it, and what came of the request, even
when the promoting process dies between asking and hearing back."""

from __future__ import annotations

import json
import signal

import httpx
import pytest
from click.testing import CliRunner

from firetitan_track import Ledger
from firetitan_track.projections.audit import eval_rows
from runner.cli import main
from tests.helpers import cli, small_spec


class _Done:
    def __init__(self, result):
        self.returncode, self.stdout, self.stderr = result.exit_code, result.stdout, result.stderr


def inproc(url: str, *args: str) -> _Done:
    """The CLI in this process (no interpreter start): for commands no test kills."""
    return _Done(CliRunner().invoke(main, ["--ledger", url, *args]))


@pytest.fixture(scope="module")
def trained(local_url, tmp_path_factory):
    """A finished 4-step SFT run with evals at steps 0, 2 and 4."""
    tmp = tmp_path_factory.mktemp("promote")
    url = f"sqlite:///{tmp}/ledger.db"
    spec = small_spec(tmp, local_url, name="prom")
    proc = cli(url, "run", str(spec), "--run-id", "up", "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return url, spec


def _events(url: str, run_id: str) -> list:
    return Ledger.open(url).read(run_id)


def _pending_promotion(url: str) -> str | None:
    """What `status up` says of an unsettled promotion (its table line agrees with --json)."""
    table = inproc(url, "status", "up")
    row = json.loads(inproc(url, "status", "up", "--json").stdout)
    line = next(line for line in table.stdout.splitlines() if line.startswith("pending_promotion"))
    assert line.split(None, 1)[1] == (row["pending_promotion"] or "-")
    return row["pending_promotion"]


def _model(local_url: str, name: str) -> dict | None:
    resp = httpx.get(f"{local_url}/v1/{name}", headers={"Authorization": "Bearer local"})
    return None if resp.status_code == 404 else resp.json()


def test_best_promotes_the_top_score_records_why_and_audit_shows_it(trained, local_url):
    url, _ = trained
    rows = [r for r in eval_rows(_events(url, "up")) if r.score is not None]
    top = max(r.score for r in rows)
    expected = [r for r in rows if r.score == top][-1]  # ties: the latest

    proc = inproc(url, "promote", "up", "--best", "--model-id", "up-best", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert (out["snapshot_path"], out["eval_id"], out["score"]) == (expected.snapshot_path, expected.eval_id, top)

    events = _events(url, "up")
    requested, promoted = events[-2], events[-1]
    assert requested.type == "PromotionRequested" and promoted.type == "ModelPromoted"
    assert promoted.data["request_id"] == requested.event_id
    assert requested.data["eval_id"] == expected.eval_id and requested.data["forced"] is False
    model = _model(local_url, promoted.data["model"])
    assert model is not None and model["sourceCheckpoint"].endswith("/" + requested.data["checkpoint_id"])

    audit = json.loads(inproc(url, "audit", "up", "--json").stdout)
    assert {r["eval_id"]: r["promoted_as"] for r in audit} == {
        r.eval_id: (["up-best"] if r.snapshot_path == expected.snapshot_path else []) for r in eval_rows(events)}

    # the same promotion again changes nothing; the same id for another snapshot is refused
    version = Ledger.open(url).stream_version("up")
    again = inproc(url, "promote", "up", "--snapshot", expected.snapshot_path, "--model-id", "up-best")
    assert again.returncode == 0 and again.stdout.startswith("already promoted")
    assert Ledger.open(url).stream_version("up") == version
    other = next(r for r in rows if r.snapshot_path != expected.snapshot_path)
    clash = inproc(url, "promote", "up", "--snapshot", other.snapshot_path, "--model-id", "up-best")
    assert clash.returncode == 1 and expected.snapshot_path in clash.stderr
    bad_id = inproc(url, "promote", "up", "--best", "--model-id", "Not_A_Model_Id")
    assert bad_id.returncode == 1 and "--model-id 'Not_A_Model_Id'" in bad_id.stderr
    assert Ledger.open(url).stream_version("up") == version


def test_mlflow_export_tags_the_promoted_snapshot(trained, tmp_path):
    url, _ = trained
    if not any(ev.type == "ModelPromoted" for ev in _events(url, "up")):
        assert inproc(url, "promote", "up", "--best", "--model-id", "up-best").returncode == 0
    promoted = [ev.data for ev in _events(url, "up") if ev.type == "ModelPromoted"]
    store = f"sqlite:///{tmp_path}/mlflow.db"
    proc = inproc(url, "export", "mlflow", "up", "--tracking-uri", store, "--no-artifacts", "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    from mlflow import MlflowClient

    client = MlflowClient(store)
    exp = client.get_experiment_by_name("firetitan-track")
    tags = {m.tags["snapshot_path"]: m.tags.get("promoted_as") for m in client.search_logged_models([exp.experiment_id])}
    for path, promoted_as in tags.items():
        ids = [p["model_id"] for p in promoted if p["snapshot_path"] == path]
        assert promoted_as == (",".join(ids) if ids else None)


def test_a_never_evaluated_snapshot_is_refused_unless_forced(trained, ledger_url, local_url):
    _, spec = trained
    # step 2's snapshot is saved, then the runner dies before syncing and evaluating it
    crashed = cli(ledger_url, "run", str(spec), "--run-id", "c", "--quiet", crash_at="event:SnapshotSaved:2")
    assert crashed.returncode == -signal.SIGKILL
    path = [ev.data["path"] for ev in _events(ledger_url, "c") if ev.type == "SnapshotSaved"][-1]
    refused = inproc(ledger_url, "promote", "c", "--snapshot", path, "--model-id", "c-unscored")
    assert refused.returncode == 1 and "never evaluated" in refused.stderr and "--force" in refused.stderr
    assert not [ev for ev in _events(ledger_url, "c") if ev.type.startswith("Promotion")]
    forced = inproc(ledger_url, "promote", "c", "--snapshot", path, "--model-id", "c-unscored", "--force")
    assert forced.returncode == 0, forced.stderr[-2000:]
    requested = next(ev for ev in _events(ledger_url, "c") if ev.type == "PromotionRequested")
    assert requested.data["forced"] is True and requested.data["eval_id"] is None
    missing = inproc(ledger_url, "promote", "c", "--snapshot", "no-such-snapshot", "--model-id", "c-x")
    assert missing.returncode == 1 and "no snapshot 'no-such-snapshot'" in missing.stderr


def test_a_crash_between_request_and_outcome_is_settled_by_the_next_promote_or_resume(trained, local_url):
    url, _ = trained
    # dies before the service is asked: the next promote records the failure, then promotes
    died = cli(url, "promote", "up", "--best", "--model-id", "up-early", crash_at="event:PromotionRequested:1")
    assert died.returncode == -signal.SIGKILL
    shown = _pending_promotion(url)  # `status` shows it unsettled, and how it settles
    assert "up-early from " in shown and "promote up --snapshot " in shown and "resume up" in shown
    assert inproc(url, "promote", "up", "--best", "--model-id", "up-early").returncode == 0
    assert _pending_promotion(url) is None
    tail = [ev for ev in _events(url, "up") if ev.data.get("model_id") == "up-early"]
    assert [ev.type for ev in tail] == ["PromotionRequested", "PromotionFailed", "PromotionRequested",
                                        "ModelPromoted"]
    assert tail[1].data["request_id"] == tail[0].event_id and tail[3].data["request_id"] == tail[2].event_id

    # dies after the service promoted, before the ledger heard: resume settles it as promoted
    died = cli(url, "promote", "up", "--best", "--model-id", "up-late", crash_at="before:ModelPromoted:1")
    assert died.returncode == -signal.SIGKILL
    assert _events(url, "up")[-1].type == "PromotionRequested"
    assert "up-late from " in _pending_promotion(url)
    resumed = inproc(url, "resume", "up", "--quiet")
    assert "already completed" in resumed.stderr  # a finished run: nothing to train, the promotion settled
    settled = _events(url, "up")[-1]
    assert settled.type == "ModelPromoted" and settled.data["recovered"] is True
    assert settled.data["request_id"] == _events(url, "up")[-2].event_id
    assert _model(local_url, settled.data["model"]) is not None
    assert _pending_promotion(url) is None
    version = Ledger.open(url).stream_version("up")
    again = inproc(url, "promote", "up", "--best", "--model-id", "up-late")
    assert again.returncode == 0 and Ledger.open(url).stream_version("up") == version


def test_a_snapshot_no_recorded_trainer_saved_is_refused_before_the_service_is_asked(trained, tmp_path):
    """A ledger is untrusted: a record whose snapshots no provisioning precedes (a partial or
    edited one) names no trainer job, so promote says so instead of asking the service for
    the checkpoints of job None."""
    from firetitan_track.events import new_event

    url, _ = trained
    # the finished run's record without its provisioning (nor the promotions other tests made of it)
    kept = [new_event(ev.fact) for ev in _events(url, "up")
            if ev.type not in ("TrainerProvisioned", "Reconnected", "ModelPromoted")
            and not ev.type.startswith("Promotion")]
    partial = f"sqlite:///{tmp_path}/partial.db"
    Ledger.open(partial).append("up", kept, expected_version=0)
    path = next(ev.data["path"] for ev in _events(partial, "up") if ev.type == "SnapshotSaved")
    refused = inproc(partial, "promote", "up", "--snapshot", path, "--model-id", "up-orphan", "--force")
    assert refused.returncode == 1 and "names no trainer job before snapshot" in refused.stderr, refused.stderr
    assert not [ev for ev in _events(partial, "up") if ev.type.startswith("Promotion")]
