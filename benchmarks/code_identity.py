"""What recording a run's code identity adds to its start, on a large repository.

Builds a temporary git repository of ``--files`` files (default 50,000 in 500 folders, about
the size of a large monorepo checkout), commits it, and times
:func:`firetitan_track.code_identity.code_identity` against a real SQLite ledger (the diff
blob is stored), the median of ``--rounds``:

- ``clean_ms``: the tree as committed;
- ``dirty_ms``: one tracked file edited and one new file (``git diff`` runs, the diff is stored);
- ``git_status_ms``: the baseline measured in the same run: one bare ``git status --porcelain``,
  the least any dirty check must pay on this tree; ``*_vs_git_status`` are the ratios;
- ``this_repo_ms``: the same call on this checkout (the runner's own case).

Target: ``dirty_ms`` a few hundred ms at most. Prints one JSON object.

Usage: ``python benchmarks/code_identity.py [--files N] [--rounds N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build_repo(root: Path, files: int) -> Path:
    per_dir = 100
    for i in range(files):
        folder = root / f"pkg{i // per_dir:04d}"
        if i % per_dir == 0:
            folder.mkdir(parents=True)
        (folder / f"mod{i % per_dir:03d}.py").write_text(f"VALUE_{i} = {i}\n\ndef f_{i}(x):\n    return x + {i}\n")
    env = {**os.environ, "GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@example.com", "GIT_COMMITTER_NAME": "b",
           "GIT_COMMITTER_EMAIL": "b@example.com"}
    # no automatic gc: it would pack 50,000 objects in the background while the timing runs
    for args in (["init", "-q"], ["config", "gc.auto", "0"], ["add", "-A"], ["commit", "-qm", "big"]):
        subprocess.run(["git", "-C", str(root), *args], check=True, env=env)
    return root


def timed(fn, rounds: int) -> float:
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1000)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()

    from firetitan_track import Ledger
    from firetitan_track.code_identity import code_identity

    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
        repo = build_repo(Path(tmp) / "big", args.files)
        ledger = Ledger.open(f"sqlite:///{tmp}/ledger.db")
        code_dir = repo / "pkg0000"
        entry = code_dir / "mod000.py"

        def identity() -> dict:
            return code_identity(ledger.put_blob, [code_dir], entry=entry, argv=["mod000.py"])

        def git_status() -> None:
            subprocess.run(["git", "-C", str(repo), "status", "--porcelain"], check=True, capture_output=True)

        identity()  # git's first status refreshes its index stat cache; a user's repository has one
        status_ms = timed(git_status, args.rounds)
        clean_ms = timed(identity, args.rounds)
        assert identity()["git"]["dirty"] is False
        with open(repo / "pkg0100" / "mod042.py", "a") as f:
            f.write("EXTRA = 1\n")
        (repo / "pkg0200" / "new_module.py").write_text("NEW = True\n")
        dirty_ms = timed(identity, args.rounds)
        found = identity()["git"]
        assert set(found["changed"]) == {"pkg0100/mod042.py", "pkg0200/new_module.py"}, found
        this_repo_ms = timed(lambda: code_identity(ledger.put_blob, [REPO / "runner", REPO / "firetitan_track"]),
                             args.rounds)
        ledger.close()

    print(json.dumps({
        "files": args.files,
        "git_status_ms": round(status_ms, 1),
        "clean_ms": round(clean_ms, 1),
        "dirty_ms": round(dirty_ms, 1),
        "clean_vs_git_status": round(clean_ms / status_ms, 2),
        "dirty_vs_git_status": round(dirty_ms / status_ms, 2),
        "this_repo_ms": round(this_repo_ms, 1),
    }))


if __name__ == "__main__":
    main()
