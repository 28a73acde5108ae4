"""Whether a process of this host is alive: one answer for the lease (a dead holder frees it
at once), the recorder's boot (a run's beginner that died) and the local service's supervisor."""

from __future__ import annotations

import os

__all__ = ["pid_alive"]


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs: one owned by another user is alive; a zombie (exited, not
    yet reaped by its parent) is not."""
    if pid <= 0:  # 0 and negatives name process groups, not a process
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, owned by someone else
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"
    except (OSError, IndexError):  # no /proc (macOS): os.kill's answer stands
        return True
