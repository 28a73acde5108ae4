"""Audit bundles on real runs: a two-trial sweep and a rerun, trained by the runner on the
session's local service with an API key in the environment, bundled, checked offline,
and imported into other SQLite and PostgreSQL ledgers."""

from __future__ import annotations

import gzip
import hashlib
import json
import tarfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from firetitan_track import Ledger
from firetitan_track.blobs import canonical_json
from firetitan_track.bundle import BundleError, StreamStore, bundle_blobs, read_bundle
from firetitan_track.projections.audit import audit
from firetitan_track.projections.compare import compare_sweep
from firetitan_track.projections.lineage import lineage
from firetitan_track.projections.replay import replay
from runner.cli import main
from tests.helpers import needs_postgres, small_spec
from tests.ledger.forge import rechained

API_KEY = "fw-bundle-test-5d1c9e0a7b3f42e8"  # set while the runs are recorded and bundled
STREAMS = ["again", "sweep:lr", "lr-t0", "lr-t1"]


@pytest.fixture(scope="module")
def source(local_url: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A ledger holding sweep "lr" (trials lr-t0, lr-t1) and "again", a rerun of lr-t0."""
    tmp = tmp_path_factory.mktemp("bundle-source")
    url = f"sqlite:///{tmp / 'ledger.db'}"
    spec = small_spec(tmp, local_url, name="bundle", run={"steps": 2})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FIREWORKS_API_KEY", API_KEY)  # the runner sends it to the service on every call
        for args in (["sweep", str(spec), "--grid", "optim.learning_rate=1e-3,3e-3", "--sweep-id", "lr",
                      "--no-mlflow", "--quiet"], ["rerun", "lr-t0", "--run-id", "again", "--quiet"]):
            result = _cli(url, *args)
            assert result.exit_code == 0, result.output
    return url


@pytest.fixture(scope="module")
def bundle_file(source: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "runs.tar.gz"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FIREWORKS_API_KEY", API_KEY)
        result = _cli(source, "bundle", "again", "--sweep", "lr", "-o", str(out))
    assert result.exit_code == 0, result.output
    return out


def _cli(url: str, *args: str) -> Any:
    return CliRunner().invoke(main, ["--ledger", url, *args])


def _members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path, "r:gz") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


def _repack(members: dict[str, bytes]) -> bytes:
    """A bundle rebuilt by the writer's own packer, so only what a test changed differs."""
    from firetitan_track.bundle import MANIFEST, _pack

    return _pack([(MANIFEST, members[MANIFEST])] + [(k, v) for k, v in members.items() if k != MANIFEST])


# -- writing and verifying --------------------------------------------------------------


def test_bundle_holds_the_runs_and_every_blob_they_reference(source: str, bundle_file: Path) -> None:
    found = read_bundle(bundle_file)
    assert found.intact, found.problems
    assert list(found.streams) == STREAMS
    ledger = Ledger.open(source)
    for name in STREAMS:
        assert found.streams[name] == StreamStore(ledger).rows(name)
    started = ledger.read("lr-t0")[0].data
    referenced = {started["prompt_sets"]["eval"]} | {
        ev.data["completions_digest"] for name in STREAMS for ev in ledger.read(name) if ev.type == "SamplesRecorded"}
    assert referenced <= set(found.blobs)
    carried = {digest: data for digest, _, data in bundle_blobs(found)}
    assert set(carried) == set(found.blobs)
    for digest, data in carried.items():
        assert ledger.get_blob(digest) == data and found.blobs[digest].size == len(data)
    # the runs' signed heads travel with them: each run's end, and every sweep step
    assert {h.run_id for h in found.heads} == set(STREAMS)
    for name in STREAMS:
        assert found.head_checks[name].vouched == {ledger.signing_key().public_text: len(found.streams[name]) - 1}
    ledger.close()
    # the same runs give the same bytes
    again = bundle_file.parent / "again.tar.gz"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FIREWORKS_API_KEY", API_KEY)
        assert _cli(source, "bundle", "again", "--sweep", "lr", "-o", str(again)).exit_code == 0
    assert again.read_bytes() == bundle_file.read_bytes()


def test_no_secret_reaches_a_bundle(bundle_file: Path) -> None:
    raw = bundle_file.read_bytes()
    assert API_KEY.encode() not in raw and API_KEY.encode() not in gzip.decompress(raw)
    for name, data in _members(bundle_file).items():
        assert API_KEY.encode() not in data, name


def test_a_credential_set_after_recording_keeps_its_runs_out_of_bundles(source: str, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # a value recorded in the clear that is now a secret: a bundle cannot redact it without
    # breaking the chain, so it refuses and writes nothing
    trainer = next(ev for ev in Ledger.open(source).read("lr-t0") if ev.type == "TrainerProvisioned")
    monkeypatch.setenv("FIREWORKS_API_KEY", trainer.data["trainer_job_id"])
    out = tmp_path / "leak.tar.gz"
    result = _cli(source, "bundle", "lr-t0", "-o", str(out))
    assert result.exit_code == 1
    assert "run lr-t0 version" in result.output and "credential" in result.output
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_verify_bundle_needs_no_ledger(bundle_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    nowhere = f"sqlite:///{tmp_path / 'none' / 'ledger.db'}"
    result = _cli(nowhere, "verify", "--bundle", str(bundle_file))
    assert result.exit_code == 0, result.output
    assert result.output.startswith("intact") and "4 streams" in result.output
    assert list(tmp_path.iterdir()) == []  # no ledger was created or opened


def test_every_flipped_byte_is_caught(bundle_file: Path, tmp_path: Path) -> None:
    raw = bundle_file.read_bytes()
    positions = sorted(set(range(0, 128)) | set(range(0, len(raw), 23)) | set(range(len(raw) - 16, len(raw))))
    bad = tmp_path / "bad.tar.gz"
    for i in positions:
        flipped = bytearray(raw)
        flipped[i] ^= 0x10
        bad.write_bytes(flipped)
        try:
            found = read_bundle(bad)
        except BundleError:
            continue
        assert not found.intact, f"a flipped byte at offset {i} went unnoticed"


def test_an_edited_event_is_named_even_when_every_digest_is_recomputed(bundle_file: Path, tmp_path: Path) -> None:
    members = _members(bundle_file)
    manifest = json.loads(members["manifest.json"])
    entry = next(s for s in manifest["streams"] if s["run_id"] == "lr-t1")
    lines = members[entry["file"]].decode().splitlines()
    scored = next(i for i, line in enumerate(lines) if json.loads(line)["type"] == "EvalScored")
    ev = json.loads(lines[scored])
    ev["data"]["score"] = 1.0
    lines[scored] = canonical_json(ev)
    members[entry["file"]] = ("\n".join(lines) + "\n").encode()
    entry["sha256"] = hashlib.sha256(members[entry["file"]]).hexdigest()
    members["manifest.json"] = json.dumps(manifest).encode()
    forged = tmp_path / "forged.tar.gz"
    forged.write_bytes(_repack(members))

    result = _cli("sqlite:///unused.db", "verify", "--bundle", str(forged))
    assert result.exit_code == 1
    assert result.output.splitlines()[0] == (f"bundle {forged}: run lr-t1 version {ev['version']}: hash mismatch: "
                                             "the event was edited, reordered, or an event before it was removed")


# -- importing ----------------------------------------------------------------------------


def _same_views(source: Ledger, target: Ledger) -> None:
    for run_id in ("lr-t0", "lr-t1", "again"):
        mine, theirs = source.read(run_id), target.read(run_id)
        assert [(e.version, e.event_id, e.type, e.schema_version, e.data, e.recorded_at, e.hash) for e in theirs] == \
               [(e.version, e.event_id, e.type, e.schema_version, e.data, e.recorded_at, e.hash) for e in mine]
        assert [r.to_dict() for r in audit(target, run_id)] == [r.to_dict() for r in audit(source, run_id)]
        a, b = replay(source, run_id), replay(target, run_id)
        assert b.intact and (b.events, b.superseded, asdict(b.state)) == (a.events, a.superseded, asdict(a.state))
        for row in audit(source, run_id):
            assert lineage(target, row.snapshot_path, run_id).to_dict() == lineage(source, row.snapshot_path,
                                                                                 run_id).to_dict()
    assert [t.to_dict() for t in compare_sweep(target, "lr")] == [t.to_dict() for t in compare_sweep(source, "lr")]
    assert target.verify() == []


def test_import_into_another_sqlite_ledger_is_the_same_history_and_idempotent(
        source: str, bundle_file: Path, tmp_path: Path) -> None:
    target_url = f"sqlite:///{tmp_path / 'other.db'}"
    result = _cli(target_url, "import", str(bundle_file))
    assert result.exit_code == 0, result.output
    with Ledger.open(source) as src, Ledger.open(target_url) as dst:
        _same_views(src, dst)
        positions = [(e.run_id, e.version, e.position) for e in dst.follow(0, limit=10_000)]
    assert len(positions) == sum(len(Ledger.open(source).read(s)) for s in STREAMS)

    again = _cli(target_url, "import", str(bundle_file))
    assert again.exit_code == 0 and "nothing new" in again.output
    with Ledger.open(target_url) as dst:
        assert [(e.run_id, e.version, e.position) for e in dst.follow(0, limit=10_000)] == positions
    assert _cli(target_url, "verify").output.strip() == "intact"


def test_an_imported_run_exports_to_mlflow_as_the_original_does(source: str, bundle_file: Path, tmp_path: Path,
                                                                mlflow_server: str) -> None:
    import uuid

    from mlflow import MlflowClient

    from firetitan_track.projections.mlflow import export_mlflow

    target_url = f"sqlite:///{tmp_path / 'other.db'}"
    assert _cli(target_url, "import", str(bundle_file)).exit_code == 0
    views = []
    for url in (source, target_url):
        experiment = f"bundle-{uuid.uuid4().hex[:10]}"
        with Ledger.open(url) as ledger:
            export_mlflow(ledger, mlflow_server, ["lr-t0"], experiment=experiment)
        views.append(_mlflow_view(MlflowClient(mlflow_server), experiment))
    assert set(views[0]) == {"lr-t0", "sweep lr"}
    assert views[1] == views[0]  # the sweep's parent included: its times are the sweep's, not the export's


def _mlflow_view(client: Any, experiment: str) -> dict[str, Any]:
    """What an MLflow reader sees of each run, with MLflow's own ids replaced by ledger names."""
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    name_of = {r.info.run_id: r.data.tags["mlflow.runName"] for r in runs}
    view = {}
    for r in runs:
        ml = r.info.run_id
        ledger_run = r.data.tags.get("ledger_run_id")
        models = client.search_logged_models([exp.experiment_id],
                                             filter_string=f"tags.ledger_run_id = '{ledger_run}'") if ledger_run else []
        view[name_of[ml]] = {
            "status": r.info.status, "start": r.info.start_time, "end": r.info.end_time,
            "parent": name_of.get(r.data.tags.get("mlflow.parentRunId", "")),
            "params": r.data.params,
            "tags": {k: v for k, v in r.data.tags.items() if not k.startswith("mlflow.") or k == "mlflow.runName"},
            "metrics": {k: sorted((m.step, m.value, m.timestamp) for m in client.get_metric_history(ml, k))
                        for k in r.data.metrics},
            "datasets": sorted((d.dataset.name, d.dataset.digest, d.dataset.source) for d in r.inputs.dataset_inputs),
            "artifacts": sorted(_artifacts(client, ml)),
            "models": sorted((m.name, sorted(m.tags.items()), sorted(m.params.items()),
                              sorted((x.key, x.step, x.value, x.timestamp) for x in m.metrics)) for m in models),
        }
    return view


def _artifacts(client: Any, ml: str, path: str | None = None) -> list[tuple[str, int | None]]:
    out = []
    for a in client.list_artifacts(ml, path):
        out += _artifacts(client, ml, a.path) if a.is_dir else [(a.path, a.file_size)]
    return out


def test_a_run_held_with_another_history_is_refused_and_nothing_is_written(
        source: str, bundle_file: Path, local_url: str, tmp_path: Path) -> None:
    target_url = f"sqlite:///{tmp_path / 'other.db'}"
    # a run of its own under the same id, in the ledger the bundle is imported into
    spec = small_spec(tmp_path, local_url, name="clash", run={"steps": 1})
    assert _cli(target_url, "run", str(spec), "--run-id", "lr-t0", "--quiet").exit_code == 0

    def contents() -> tuple[list[Any], int]:
        with Ledger.open(target_url) as dst, dst.engine.connect() as conn:
            return ([(e.run_id, e.version, e.hash) for e in dst.follow(0, limit=10_000)],
                    conn.exec_driver_sql("SELECT count(*) FROM blobs").scalar())

    before = contents()
    result = _cli(target_url, "import", str(bundle_file))
    assert result.exit_code == 1
    assert "run 'lr-t0' already exists" in result.output and "different history" in result.output
    assert contents() == before  # not even the runs that did not clash, nor their blobs


@needs_postgres
def test_import_into_postgres_is_the_same_history_and_idempotent(source: str, bundle_file: Path,
                                                                 empty_schema_url: str) -> None:
    from firetitan_track.store import upgrade_schema

    upgrade_schema(empty_schema_url)
    result = _cli(empty_schema_url, "import", str(bundle_file))
    assert result.exit_code == 0, result.output
    with Ledger.open(source) as src, Ledger.open(empty_schema_url) as dst:
        _same_views(src, dst)
        assert dst.settle()
        count = len(dst.follow(0, limit=10_000))
    assert "nothing new" in _cli(empty_schema_url, "import", str(bundle_file)).output
    with Ledger.open(empty_schema_url) as dst:
        assert dst.settle()
        assert len(dst.follow(0, limit=10_000)) == count


# -- bad input ----------------------------------------------------------------------------


def _import_refused(path: Path, tmp_path: Path, *expected: str) -> None:
    target = tmp_path / "target" / "ledger.db"
    for args in (["import", str(path)], ["verify", "--bundle", str(path)]):
        result = _cli(f"sqlite:///{target}", *args)
        assert result.exit_code == 1, result.output
        for text in expected:
            assert text in result.output, result.output
    assert not target.parent.exists()  # nothing written, not even an empty ledger


def test_a_truncated_bundle_is_refused(bundle_file: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(bundle_file.read_bytes()[: bundle_file.stat().st_size // 2])
    _import_refused(cut, tmp_path, "cut.tar.gz is truncated")


def test_foreign_files_are_refused(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not a bundle\n")
    _import_refused(text, tmp_path, "notes.txt is not a firetitan-track bundle")
    other = tmp_path / "other.tar.gz"  # a tar.gz, but not ours
    with tarfile.open(other, "w:gz") as tar:
        tar.add(text, arcname="notes.txt")
    _import_refused(other, tmp_path, "other.tar.gz is not a firetitan-track bundle", "no manifest.json")


def test_a_bundle_from_a_newer_format_is_refused(bundle_file: Path, tmp_path: Path) -> None:
    members = _members(bundle_file)
    manifest = json.loads(members["manifest.json"])
    manifest["format_version"] += 1
    members["manifest.json"] = json.dumps(manifest).encode()
    newer = tmp_path / "newer.tar.gz"
    newer.write_bytes(_repack(members))
    _import_refused(newer, tmp_path, "written by a newer firetitan-track", "upgrade firetitan-track")


def test_events_of_a_newer_schema_version_are_refused(bundle_file: Path, tmp_path: Path) -> None:
    members = _members(bundle_file)
    manifest = json.loads(members["manifest.json"])
    entry = next(s for s in manifest["streams"] if s["run_id"] == "again")
    rows = [json.loads(line) for line in members[entry["file"]].decode().splitlines()]
    scored = next(r for r in rows if r["type"] == "EvalScored")
    scored["schema_version"] += 1
    rows = rechained(rows)  # a well-formed bundle, only newer than this code (and signed by no one)
    members[entry["file"]] = "".join(canonical_json(r) + "\n" for r in rows).encode()
    entry["sha256"], entry["head_hash"] = hashlib.sha256(members[entry["file"]]).hexdigest(), rows[-1]["hash"]
    manifest["signed_heads"] = [h for h in manifest["signed_heads"] if h["run_id"] != "again"]
    members["manifest.json"] = json.dumps(manifest).encode()
    newer = tmp_path / "newer.tar.gz"
    newer.write_bytes(_repack(members))
    assert read_bundle(newer).intact  # verify checks chains and digests, which hold
    target = tmp_path / "target.db"
    result = _cli(f"sqlite:///{target}", "import", str(newer))
    assert result.exit_code == 1
    assert f"run again version {scored['version']} has EvalScored schema version" in result.output
    assert "newer firetitan-track" in result.output
    assert not target.exists()


def test_an_unknown_run_or_sweep_writes_no_bundle(source: str, tmp_path: Path) -> None:
    out = tmp_path / "x.tar.gz"
    for args, name in ((["no-such-run"], "no run 'no-such-run'"), (["--sweep", "nope"], "no sweep 'nope'"),
                       (["lr-t0", "no-such-run"], "no run 'no-such-run'")):
        result = _cli(source, "bundle", *args, "-o", str(out))
        assert result.exit_code == 1 and name in result.output, result.output
        assert list(tmp_path.iterdir()) == []
