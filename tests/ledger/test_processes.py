"""pid_alive, the one answer the lease, the recorder's boot and the local service's supervisor
share: real child processes, running, exited but not reaped (a zombie), and reaped."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from firetitan_track.processes import pid_alive


def test_a_running_process_is_alive_and_an_exited_one_is_not_even_before_it_is_reaped() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        assert pid_alive(child.pid)
        assert pid_alive(os.getpid())
    finally:
        child.stdin.close()  # it exits; not waited for, it stays a zombie
    deadline = time.monotonic() + 30
    while pid_alive(child.pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not pid_alive(child.pid)  # exited: a zombie until its parent reaps it
    with open(f"/proc/{child.pid}/stat") as f:
        assert f.read().split(") ", 1)[1][:1] == "Z"  # still a zombie: the answer came from its state
    child.wait()
    assert not pid_alive(child.pid)


def test_pid_zero_and_negatives_name_no_process() -> None:
    assert not pid_alive(0)  # os.kill(0, 0) would signal this process's group, and "succeed"
    assert not pid_alive(-1)
