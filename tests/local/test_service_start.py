"""Starting the local service from several processes at once yields one service."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from runner.local import supervisor as service

REPO = Path(__file__).resolve().parents[2]


def test_concurrent_ensure_running_starts_exactly_one_service(tmp_path):
    code = ("import sys; from runner.local.supervisor import ensure_running; "
            "print(ensure_running(sys.argv[1]).pid)")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              cwd=REPO) for _ in range(3)]
    try:
        pids = {p.communicate(timeout=120)[0].strip() for p in procs}
        assert len(pids) == 1 and all(pids)
        info = service.running(tmp_path)
        assert info is not None and str(info.pid) in pids
    finally:
        service.stop(tmp_path)
    assert service.running(tmp_path) is None
