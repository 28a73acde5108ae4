"""Bundles built by an attacker: every digest recomputed, so only the format's rules, the event
catalogue, the run-id rule, the size limits and the signed heads stand between the forgery
and a ledger. Each case is refused by ``verify --bundle`` (exit 1, naming it) and by
``import`` (nothing written, not even an empty ledger)."""

from __future__ import annotations

import json
import tarfile
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from firetitan_track import Ledger
from firetitan_track.bundle import MANIFEST, BundleError, Limits, read_bundle
from firetitan_track.signing import SigningKey, new_key_file
from runner.cli import main
from tests.ledger.forge import Forgery, framed_tar, zero_bomb
from tests.projections.streams import write_run


def _cli(url: str, *args: str) -> Any:
    return CliRunner().invoke(main, ["--ledger", url, *args])


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = f"sqlite:///{tmp_path_factory.mktemp('hostile-source') / 'ledger.db'}"
    with Ledger.open(url) as ledger:
        write_run(ledger, "r1", steps=4)
        write_run(ledger, "r2", steps=2)
    return url


@pytest.fixture(scope="module")
def bundle_file(source: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hostile") / "runs.tar.gz"
    assert _cli(source, "bundle", "r1", "r2", "-o", str(out)).exit_code == 0
    return out


@pytest.fixture(scope="module")
def ledger_key(source: str) -> str:
    with Ledger.open(source) as ledger:
        return ledger.signing_key().public_text


def _refused(path: Path, tmp_path: Path, *expected: str) -> str:
    """verify --bundle and import both refuse ``path`` naming ``expected``; import writes nothing."""
    target = tmp_path / "target" / "ledger.db"
    outputs = []
    for args in (["verify", "--bundle", str(path)], ["import", str(path)]):
        result = _cli(f"sqlite:///{target}", *args)
        assert result.exit_code == 1, result.output
        assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output  # a message, no crash
        for text in expected:
            assert text in result.output, result.output
        outputs.append(result.output)
    assert not target.parent.exists()  # nothing written, not even an empty ledger
    return outputs[0]


# -- (1) a value from a bundle never becomes part of a path unchecked ---------------------------


def test_an_eval_id_that_climbs_out_of_a_folder_is_refused(bundle_file: Path, tmp_path: Path) -> None:
    forged = Forgery(bundle_file)
    rows = forged.rows("r1")
    for r in rows:
        if r["type"] in ("EvalStarted", "SamplesRecorded", "EvalScored"):
            r["data"]["eval_id"] = "../../../../tmp/X"
    forged.set_rows("r1", rows)
    forged.drop_heads()
    out = _refused(forged.write(tmp_path / "f.tar.gz"), tmp_path, "eval_id is a string '../../../../tmp/X', not an id")
    assert "run r1 version" in out


def test_a_stored_id_becomes_a_file_name_only_when_it_is_plain() -> None:
    from firetitan_track.ids import UnsafeId, file_name

    assert file_name("r1-eval-1", ".json") == "r1-eval-1.json"
    for bad in ("../../../../tmp/X", "/tmp/X", "a/b", "..", "", "x\n", "\x1b[31mred", "a" * 129):
        with pytest.raises(UnsafeId):
            file_name(bad, ".json")


# -- (2) gzip bombs: streamed, limited, refused early and named ----------------------------------


def test_a_zero_bomb_is_refused_early_in_bounded_memory(tmp_path: Path) -> None:
    manifest = json.dumps({"format": "firetitan-track bundle", "format_version": 2, "streams": [],
                           "blobs": [{"digest": "0" * 64, "file": f"blobs/{'0' * 64}", "sha256": "0" * 64}]}).encode()
    bomb = zero_bomb(tmp_path / "bomb.tar.gz", f"blobs/{'0' * 64}", 256 << 20, manifest)
    assert bomb.stat().st_size < 1 << 20  # a bomb: under 1 MiB on disk, 256 MiB of zeros inside
    tracemalloc.start()
    try:
        with pytest.raises(BundleError, match="expands more than 500 times its compressed size") as refused:
            read_bundle(bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "FIRETITAN_BUNDLE_MAX_RATIO" in str(refused.value)
    assert peak < 16 << 20, f"peak {peak >> 20} MiB while refusing a bomb"
    _refused(bomb, tmp_path, "is refused", "compression bomb")


def test_each_limit_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a member whose header claims more than a member may hold: refused at its header
    info = tarfile.TarInfo(f"blobs/{'1' * 64}")
    info.size = 2 << 30
    huge = tmp_path / "huge.tar.gz"
    manifest = json.dumps({"format": "firetitan-track bundle", "format_version": 2, "streams": [], "blobs": []})
    m = tarfile.TarInfo(MANIFEST)
    m.size = len(manifest)
    huge.write_bytes(framed_tar([(m, manifest.encode()), (info, b"\0" * 1024)]))
    _refused(huge, tmp_path, "holds 2 GiB, more than one member may", "FIRETITAN_BUNDLE_MAX_MEMBER_BYTES")
    # a PAX header of 32 MiB (zeros, under 64 KiB compressed) that tarfile would read whole to parse it
    pax = tarfile.TarInfo("pax")
    pax.type = tarfile.XHDTYPE
    bad = zero_bomb(tmp_path / "pax.tar.gz", pax, 32 << 20, manifest.encode())
    _refused(bad, tmp_path, "a tar header (a PAX or long-name record) larger than 1 MiB")
    # the total, and what is parsed in memory, each under their own variable
    monkeypatch.setenv("FIRETITAN_BUNDLE_MAX_BYTES", str(8 << 20))
    total = zero_bomb(tmp_path / "total.tar.gz", f"blobs/{'2' * 64}", 16 << 20, manifest.encode())
    _refused(total, tmp_path, "expands to more than 8 MiB (FIRETITAN_BUNDLE_MAX_BYTES)")
    monkeypatch.delenv("FIRETITAN_BUNDLE_MAX_BYTES")
    monkeypatch.setenv("FIRETITAN_BUNDLE_MAX_EVENT_BYTES", "50")
    _refused(total, tmp_path, "more than the manifest and event streams may together (50 bytes")
    assert Limits.from_env().events == 50


def test_a_truncated_or_appended_bundle_is_named(bundle_file: Path, tmp_path: Path) -> None:
    raw = bundle_file.read_bytes()
    (tmp_path / "cut.tar.gz").write_bytes(raw[: len(raw) - 20])
    _refused(tmp_path / "cut.tar.gz", tmp_path, "cut.tar.gz is truncated")
    (tmp_path / "more.tar.gz").write_bytes(raw + b"trailing bytes")
    _refused(tmp_path / "more.tar.gz", tmp_path, "bytes follow the end of the compressed data")


# -- (5) member names, payloads against their event types, the run-id rule ----------------------


def test_member_names_outside_the_format_are_refused(bundle_file: Path, tmp_path: Path) -> None:
    for evil in ("../x", "/tmp/x"):
        forged = Forgery(bundle_file)
        entry = forged.entry("r2")
        forged.members[evil] = forged.members.pop(entry["file"])
        entry["file"] = evil
        _refused(forged.write(tmp_path / "names.tar.gz"), tmp_path, f"its file {evil!r} is not a canonical member name")
        forged = Forgery(bundle_file)
        blob = forged.manifest["blobs"][0]
        forged.members[evil] = forged.members.pop(blob["file"])
        blob["file"] = evil
        _refused(forged.write(tmp_path / "names.tar.gz"), tmp_path, "is not a canonical member name (blobs/<sha256>)")
    forged = Forgery(bundle_file)
    forged.members["../evil"] = b"payload"  # in the archive, not the manifest: tar would write it outside
    _refused(forged.write(tmp_path / "extra.tar.gz"), tmp_path, "'../evil': not a name this format uses")


@pytest.mark.parametrize("edit, named", [
    (lambda r: r["data"].pop("step") if r["type"] == "StepCompleted" else None, "StepCompleted: missing step"),
    (lambda r: r["data"].pop("step") if r["type"] == "EvalScored" else None, "EvalScored: missing step"),
    (lambda r: r.update(type="RunFailed") if r["type"] == "RunCompleted" else None, "RunFailed: missing error"),
    (lambda r: r["data"].update(score="high") if r["type"] == "EvalScored" else None,
     "score is a string 'high', not a number"),
])
def test_a_payload_its_event_type_refuses_is_refused(bundle_file: Path, tmp_path: Path, edit: Any,
                                                      named: str) -> None:
    forged = Forgery(bundle_file)
    rows = forged.rows("r1")
    for r in rows:
        edit(r)
    forged.set_rows("r1", rows)
    forged.drop_heads()
    _refused(forged.write(tmp_path / "payload.tar.gz"), tmp_path, "run r1 version", named)


@pytest.mark.parametrize("run_id", ["../../evil\nrun", "\x1b[31mr1\x1b[0m", "a/b", "-dash", "sweep:../x"])
def test_a_run_id_that_breaks_the_rule_is_refused(bundle_file: Path, tmp_path: Path, run_id: str) -> None:
    forged = Forgery(bundle_file)
    rows = forged.rows("r2")
    for r in rows:
        r["run_id"] = run_id
    forged.entry("r2")["run_id"] = run_id
    forged.set_rows(run_id, rows)
    forged.drop_heads()
    out = _refused(forged.write(tmp_path / "ids.tar.gz"), tmp_path, "a run id is 1-128 letters")
    assert "\x1b" not in out and "evil\nrun" not in out  # shown escaped: an id cannot repaint the terminal


# -- (6) signed heads: a re-chained forgery, truncation, and who vouches ------------------------


def test_the_intact_bundle_says_who_vouches_for_it(bundle_file: Path, tmp_path: Path, ledger_key: str) -> None:
    result = _cli("sqlite:///unused.db", "verify", "--bundle", str(bundle_file), "--trust", ledger_key)
    assert result.exit_code == 0, result.output
    assert f"run r1: vouched for by {ledger_key}" in result.output and "(all of its" in result.output
    assert result.output.splitlines()[-1].startswith("intact:") and "signed heads" in result.output


def test_a_rechained_forgery_is_caught_by_its_signed_head(bundle_file: Path, tmp_path: Path,
                                                           ledger_key: str) -> None:
    forged = Forgery(bundle_file)
    rows = forged.rows("r1")
    next(r for r in rows if r["type"] == "EvalScored")["data"]["score"] = 1.0
    forged.set_rows("r1", rows)  # chain, manifest and header recomputed: only the signature is left
    _refused(forged.write(tmp_path / "score.tar.gz"), tmp_path, "differs from its signed head",
             "the history before it was rewritten")
    # the forger drops the signatures too: intact to anyone who trusts no key, refused to one who does
    forged.drop_heads("r1")
    path = forged.write(tmp_path / "unsigned.tar.gz")
    assert read_bundle(path).intact
    trusting = _cli("sqlite:///unused.db", "verify", "--bundle", str(path), "--trust", ledger_key)
    assert trusting.exit_code == 1 and "run r1 version 0: no trusted key vouches for it" in trusting.output
    assert "run r2: vouched for by" in trusting.output  # the untouched run still is
    # or signs them with a key of their own: a valid signature, by a key nobody trusts
    forger = SigningKey.load(new_key_file(tmp_path / "forger.pem").source and tmp_path / "forger.pem")
    forged.sign_heads("r1", forger)
    path = forged.write(tmp_path / "resigned.tar.gz")
    assert read_bundle(path).intact
    trusting = _cli("sqlite:///unused.db", "verify", "--bundle", str(path), "--trust", ledger_key)
    assert trusting.exit_code == 1 and "no trusted key vouches for it (signed by" in trusting.output


def test_truncation_past_a_signed_head_is_caught(bundle_file: Path, tmp_path: Path) -> None:
    forged = Forgery(bundle_file)
    rows = forged.rows("r1")
    forged.set_rows("r1", rows[:-1], rechain=False)  # RunCompleted removed: the chain left is intact
    out = _refused(forged.write(tmp_path / "cut.tar.gz"), tmp_path, "events were removed")
    assert f"but version {len(rows) - 1} was signed" in out


def test_events_appended_after_the_last_signed_head_are_not_vouched_for(bundle_file: Path, tmp_path: Path,
                                                                        ledger_key: str) -> None:
    forged = Forgery(bundle_file)
    rows = forged.rows("r1")
    scored = next(r for r in rows if r["type"] == "EvalScored")
    extra = {**scored, "event_id": "f" * 32, "data": {**scored["data"], "score": 1.0}}
    forged.set_rows("r1", rows + [extra])  # appended: the signed head is still reached
    path = forged.write(tmp_path / "appended.tar.gz")
    assert read_bundle(path).intact  # without a trusted key, nothing says the tail is new
    result = _cli("sqlite:///unused.db", "verify", "--bundle", str(path), "--trust", ledger_key)
    assert result.exit_code == 1
    assert f"run r1 version {len(rows)}: versions {len(rows)}-{len(rows)} are not vouched for" in result.output


def test_import_keeps_the_signatures(bundle_file: Path, tmp_path: Path, ledger_key: str) -> None:
    url = f"sqlite:///{tmp_path / 'other.db'}"
    assert _cli(url, "import", str(bundle_file)).exit_code == 0
    result = _cli(url, "verify", "--trust", ledger_key)
    assert result.exit_code == 0 and result.output.strip().endswith("intact"), result.output
    assert "run r1: vouched for by" in result.output
