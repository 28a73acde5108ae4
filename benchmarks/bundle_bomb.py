"""Peak memory of ``verify --bundle`` on a compression bomb, printed as one JSON object.

The bomb: a bundle of about 1 MB on disk whose one blob member holds 1 GiB of zeros (the
manifest lists it; every digest in the file is right, so only the reader's limits stand in
the way). Each figure is the peak resident set (``ru_maxrss``) of a process of its own:

- ``verify_peak_mb``: ``firetitan-track verify --bundle BOMB`` (target <= 100 MB), with its
  exit status and the first line it printed (the refusal, naming the limit);
- ``whole_decompress_peak_mb``: the baseline, measured in the same run: the bundle read as
  the reader before the streaming one did (``gzip.decompress`` of the whole file, then the
  tar's members read from memory);
- ``ratio_vs_whole_decompress``: the first over the second;
- ``verify_small_bundle_peak_mb``: ``verify --bundle`` of a small valid bundle, the
  command's own footprint (Python, click, SQLAlchemy, cryptography).

Usage: python benchmarks/bundle_bomb.py [--gib 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from firetitan_track import Ledger  # noqa: E402
from firetitan_track.bundle import write_bundle  # noqa: E402
from tests.ledger.forge import zero_bomb  # noqa: E402  (the tests' bomb: every digest in it is right)
from tests.projections.streams import write_run  # noqa: E402

WHOLE_DECOMPRESS = """
import gzip, io, sys, tarfile
raw = gzip.decompress(open(sys.argv[1], 'rb').read())
with tarfile.open(fileobj=io.BytesIO(raw), mode='r:') as tar:
    members = {m.name: tar.extractfile(m).read() for m in tar}
"""


def _one(cmd: list[str]) -> tuple[float, int, str, float]:
    """(peak RSS in MB, exit status, first line of output, seconds) of ``cmd``, measured from a
    fresh interpreter whose only child it is (RUSAGE_CHILDREN is then that command's peak)."""
    probe = ("import json, resource, subprocess, sys, time\n"
             "t = time.perf_counter()\n"
             "p = subprocess.run(sys.argv[1:], capture_output=True)\n"
             "u = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
             "out = (p.stdout + p.stderr).decode(errors='replace').strip().splitlines()[:1]\n"
             "print(json.dumps([u.ru_maxrss / 1024, p.returncode, out[0] if out else '', time.perf_counter() - t]))\n")
    done = subprocess.run([sys.executable, "-c", probe, *cmd], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, check=True)
    mb, code, line, seconds = json.loads(done.stdout)
    return mb, code, line, seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gib", type=float, default=1.0, help="zeros in the bomb, GiB")
    args = parser.parse_args()
    size = int(args.gib * (1 << 30)) >> 20 << 20
    cli = [sys.executable, "-m", "runner.cli"]
    with tempfile.TemporaryDirectory() as tmp:
        digest = "0" * 64
        manifest = json.dumps({"format": "firetitan-track bundle", "format_version": 2, "streams": [],
                               "blobs": [{"digest": digest, "file": f"blobs/{digest}", "sha256": digest}]}).encode()
        path = zero_bomb(Path(tmp) / "bomb.tar.gz", f"blobs/{digest}", size, manifest)
        small = Path(tmp) / "small.tar.gz"
        with Ledger.open(f"sqlite:///{tmp}/ledger.db") as ledger:
            write_run(ledger, "r1", steps=4)
            write_bundle(ledger, small, ["r1"])

        verify_mb, verify_code, verify_line, verify_s = _one([*cli, "verify", "--bundle", str(path)])
        whole_mb, whole_code, _, whole_s = _one([sys.executable, "-c", WHOLE_DECOMPRESS, str(path)])
        small_mb, small_code, _, _ = _one([*cli, "verify", "--bundle", str(small)])
        print(json.dumps({
            "bomb_file_bytes": path.stat().st_size, "bomb_expands_to_bytes": size,
            "verify_peak_mb": round(verify_mb, 1), "verify_exit_status": verify_code, "verify_said": verify_line,
            "verify_seconds": round(verify_s, 2),
            "whole_decompress_peak_mb": round(whole_mb, 1), "whole_decompress_exit_status": whole_code,
            "whole_decompress_seconds": round(whole_s, 2),
            "ratio_vs_whole_decompress": round(verify_mb / whole_mb, 3),
            "verify_small_bundle_peak_mb": round(small_mb, 1), "verify_small_bundle_exit_status": small_code,
            "target_verify_peak_mb": 100, "load_average": os.getloadavg(),
        }, indent=1))


if __name__ == "__main__":
    main()
