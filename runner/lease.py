"""One writer per run on this machine: an OS file lock held for as long as a process drives the run.

The ledger's expected-version check already lets exactly one of two racing writers
append; the lease closes the remaining window (a second resumer that reads the
stream just after the first one's RunResumed) for writers on the same machine, and
it is released by the OS when the process dies, even by SIGKILL.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
from pathlib import Path


class RunLease:
    def __init__(self, ledger_url: str, run_id: str):
        key = hashlib.sha256(f"{ledger_url}\0{run_id}".encode()).hexdigest()[:32]
        folder = Path(tempfile.gettempdir()) / "firetitan-track-leases"
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"{key}.lock"
        self._fd: int | None = None

    def acquire(self) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return True

    def holder(self) -> str | None:
        try:
            return self.path.read_text().strip() or None
        except OSError:
            return None

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLease":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
