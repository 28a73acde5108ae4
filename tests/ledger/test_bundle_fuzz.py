"""A few thousand seeded random mutations of a valid bundle thrown at ``verify --bundle`` and
``import``: each ends in a verdict or a named refusal (a UserError), never another exception,
within bounded memory and time.

Mutations come at three depths, so each layer of the reader is reached: bytes of the file as
it is (the header's digest catches most), bytes of the tar under a recomputed gzip frame,
and edits of the members themselves (manifest, event lines, names) with every digest, the
events' chain included, recomputed as a forger would.
"""

from __future__ import annotations

import copy
import json
import random
import signal
import tracemalloc
import zlib
from pathlib import Path
from typing import Any, Callable

import pytest

from firetitan_track import Ledger
from firetitan_track.bundle import _HEADER_LEN, _frame, import_bundle, importable_bundle, read_bundle, write_bundle
from firetitan_track.errors import UserError
from tests.ledger.forge import Forgery
from tests.projections.streams import write_run

CASES = 3000
SEED = 21
CASE_MEMORY = 48 << 20  # traced peak per case (the bundle is ~20 KiB)
CASE_SECONDS = 20  # a hang guard, not a speed test


@pytest.fixture(scope="module")
def valid(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("fuzz")
    with Ledger.open(f"sqlite:///{tmp / 'source.db'}") as ledger:
        write_run(ledger, "r1", steps=2)
        write_run(ledger, "r2", steps=1)
        write_bundle(ledger, tmp / "valid.tar.gz", ["r1", "r2"])
    return tmp / "valid.tar.gz"


def _byte_edit(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.choice((1, 1, 2, 8))):
        op, i = rng.randrange(5), rng.randrange(len(b) or 1)
        if op == 0 and b:
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1 and b:
            b[i] = rng.randrange(256)
        elif op == 2:
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 16)))
        elif op == 3:
            del b[i:i + rng.randrange(1, 64)]
        else:
            b = b[:i]
    return bytes(b)


def _json_edit(rng: random.Random, node: Any) -> Any:
    """One random change somewhere in a JSON value: a key dropped, a value retyped or replaced."""
    if isinstance(node, dict) and node and rng.random() < 0.7:
        key = rng.choice(sorted(node))
        choice = rng.randrange(4)
        if choice == 0:
            del node[key]
        elif choice == 1:
            node[key] = _json_edit(rng, node[key])
        elif choice == 2:
            node[key] = rng.choice([None, -1, 2 ** 63, 1e308, "", "../../x", "\x00", [], {}, True, "a" * 300])
        else:
            node[rng.choice(["../x", "\x1b[2J", key + "_"])] = node.pop(key)
        return node
    if isinstance(node, list) and node and rng.random() < 0.7:
        i = rng.randrange(len(node))
        if rng.random() < 0.3:
            del node[i]
        else:
            node[i] = _json_edit(rng, node[i])
        return node
    return rng.choice([None, 0, -7, 3.5, "", "x", [], {}, False, "sha256", "0" * 64])


def _forged(rng: random.Random, valid: Path) -> bytes:
    f = Forgery(valid)
    what = rng.randrange(6)
    if what == 0:  # the manifest
        f.manifest = _json_edit(rng, f.manifest)
        if not isinstance(f.manifest, dict):
            f.members["manifest.json"] = json.dumps(f.manifest).encode()
            return _repacked(f.members)
    elif what in (1, 2):  # an event's fields, chain recomputed (and heads dropped, or not)
        run = rng.choice(["r1", "r2"])
        rows = f.rows(run)
        row = rng.choice(rows)
        rows[rows.index(row)] = _json_edit(rng, copy.deepcopy(row))
        try:
            f.set_rows(run, rows, rechain=what == 1)
        except (KeyError, TypeError, ValueError, AttributeError):
            f.members[f.entry(run)["file"]] = b"".join(json.dumps(r).encode() + b"\n" for r in rows)
        if rng.random() < 0.5:
            f.drop_heads(run)
    elif what == 3:  # a member renamed, removed, doubled or added
        name = rng.choice(sorted(f.members))
        op = rng.randrange(4)
        if op == 0:
            f.members[rng.choice(["../x", "/tmp/x", "blobs/zz", "events/1.jsonl", name + "/"])] = f.members.pop(name)
        elif op == 1 and name != "manifest.json":
            del f.members[name]
        elif op == 2:
            f.members["extra"] = f.members[name]
        else:
            f.members[name] = _byte_edit(rng, f.members[name])
    elif what == 4:  # a signed head edited
        if f.manifest.get("signed_heads"):
            i = rng.randrange(len(f.manifest["signed_heads"]))
            f.manifest["signed_heads"][i] = _json_edit(rng, f.manifest["signed_heads"][i])
    else:  # a stream's lines shuffled, cut or duplicated, digests recomputed
        run = rng.choice(["r1", "r2"])
        rows = f.rows(run)
        op = rng.randrange(3)
        rows = rows[:-rng.randrange(1, len(rows) + 1)] if op == 0 else rows + rows[-1:] if op == 1 else \
            rng.sample(rows, len(rows))
        f.set_rows(run, rows, rechain=rng.random() < 0.5)
    return f.packed()


def _repacked(members: dict[str, bytes]) -> bytes:
    from firetitan_track.bundle import _pack

    return _pack(list(members.items()))


def _tar_edit(rng: random.Random, valid: Path) -> bytes:
    """Bytes of the tar edited under a valid gzip frame: tar headers, sizes, names, padding."""
    raw = zlib.decompressobj(-zlib.MAX_WBITS).decompress(valid.read_bytes()[_HEADER_LEN:])
    return _frame(_byte_edit(rng, raw))


def _case(rng: random.Random, valid: Path) -> tuple[str, bytes]:
    """One mutant, at one of three depths."""
    depth = rng.randrange(3)
    if depth == 0:
        return "file bytes", _byte_edit(rng, valid.read_bytes())
    if depth == 1:
        return "tar bytes", _tar_edit(rng, valid)
    return "members", _forged(rng, valid)


def _watchdog(seconds: int) -> Callable[[], None]:
    def expired(signum: int, frame: Any) -> None:
        raise TimeoutError(f"a case ran past {seconds} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    return lambda: (signal.alarm(0), signal.signal(signal.SIGALRM, old))


def test_random_mutations_of_a_bundle_end_in_a_verdict_or_a_named_refusal(valid: Path, tmp_path: Path) -> None:
    rng = random.Random(SEED)
    target = Ledger.open(f"sqlite:///{tmp_path / 'target.db'}")
    path = tmp_path / "case.tar.gz"
    verdicts = {"refused": 0, "problems": 0, "intact": 0, "imported": 0}
    worst = 0
    tracemalloc.start()
    try:
        for n in range(CASES):
            depth, data = _case(rng, valid)
            path.write_bytes(data)
            tracemalloc.reset_peak()
            stop = _watchdog(CASE_SECONDS)
            try:
                found = read_bundle(path)
                verdicts["problems" if found.problems else "intact"] += 1
                if not found.problems:
                    import_bundle(target, importable_bundle(path))
                    verdicts["imported"] += 1
            except UserError:
                verdicts["refused"] += 1
            except Exception as exc:  # noqa: BLE001 - the promise under test: nothing else escapes
                pytest.fail(f"case {n} ({depth}, seed {SEED}): {type(exc).__name__}: {exc}")
            finally:
                stop()
            worst = max(worst, tracemalloc.get_traced_memory()[1])
            assert worst < CASE_MEMORY, f"case {n} ({depth}) peaked at {worst >> 20} MiB"
    finally:
        tracemalloc.stop()
        target.close()
    # every layer was reached: refusals, bundles with problems, and intact ones that import
    assert all(verdicts[k] for k in ("refused", "problems", "intact", "imported")), verdicts
    with Ledger.open(f"sqlite:///{tmp_path / 'target.db'}") as check:
        assert check.verify() == []  # what was imported is exactly what verified
