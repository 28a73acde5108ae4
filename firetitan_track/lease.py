"""One writer per run, across processes and machines: a lease held for as long as a process drives the run.

The ledger's expected-version check already lets exactly one of two racing writers
append; the lease closes the remaining window (a second resumer that reads the
stream just after the first one's RunResumed, and then drives the same trainer).

- **PostgreSQL** (the team ledger, any number of machines): a row in ``run_leases``
  with a fencing token. Taking the lease inserts the row, or takes over one whose
  holder stopped renewing it (``expires_at`` on the database's clock, so machines'
  clocks do not matter); every takeover increments the token. A thread renews the
  lease every third of its time to live. Every append to the run checks the token
  inside its own transaction (store.py), so a writer whose lease was taken over,
  say after a long pause, cannot write another event; :meth:`Lease.check` lets the
  loop stop before its next step too. A lease row rather than a session advisory
  lock because connections go through a pooler at team scale, and session locks
  do not survive transaction pooling.
- **SQLite** (one machine): an OS file lock, released by the OS when the process
  dies, even by SIGKILL. It sits beside the database file, keyed by the file's
  resolved path, so two spellings of one file (``sqlite:////a//b.db``, a symlink,
  a relative path) or two TMPDIRs find the same lock.

A dead writer's lease is free at once on SQLite; on PostgreSQL, at once when the
writer was on this host (its process is gone), else after its time to live
(``FIRETITAN_LEASE_TTL_S``, default 30 seconds).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import socket
import threading
import time
from pathlib import Path

from firetitan_track.errors import UserError
from firetitan_track.ledger import Ledger
from firetitan_track.processes import pid_alive
from firetitan_track.store import LeaseLost

__all__ = ["Lease", "LeaseHeld", "LeaseLost", "acquire", "try_acquire", "lease_ttl_s"]

DEFAULT_TTL_S = 30.0


class LeaseHeld(UserError):
    """Another process drives the run."""


def lease_ttl_s() -> float:
    raw = os.environ.get("FIRETITAN_LEASE_TTL_S", "")
    try:
        return float(raw) if raw else DEFAULT_TTL_S
    except ValueError:
        raise UserError(f"FIRETITAN_LEASE_TTL_S={raw!r}: expected a number of seconds") from None


def _holder() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _dead_here(holder: str) -> bool:
    """Whether ``holder`` (host:pid) is a process of this host that no longer exists."""
    host, _, pid = holder.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    return not pid_alive(int(pid))


class Lease:
    """A held lease; ``release`` (or leaving the ``with`` block) gives it up."""

    run_id: str

    def check(self) -> None:
        """Raise LeaseLost when another writer has taken the run over."""

    def attach(self, ledger: Ledger) -> None:
        """Fence ``ledger``'s appends to the run with this lease too (the lease may have
        been taken through another Ledger object, e.g. by a sweep worker)."""

    def release(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def acquire(ledger: Ledger, run_id: str, *, ttl_s: float | None = None) -> Lease:
    """The run's lease, or LeaseHeld naming the process that holds it."""
    lease, holder = try_acquire(ledger, run_id, ttl_s=ttl_s)
    if lease is None:
        raise LeaseHeld(f"run {run_id} is being written by another process ({holder}); "
                        "only one writer may drive a run at a time")
    return lease


def try_acquire(ledger: Ledger, run_id: str, *, ttl_s: float | None = None) -> tuple[Lease | None, str]:
    """(the lease, "") when free, else (None, who holds it)."""
    if ledger.engine.dialect.name == "sqlite":
        return _FileLease.try_acquire(ledger, run_id)
    return _RowLease.try_acquire(ledger, run_id, lease_ttl_s() if ttl_s is None else ttl_s)


# -- SQLite: a file lock beside the database --------------------------------------------------


_process_held: set[tuple[str, str]] = set()  # flock is per open file: guard this process's own threads too
_process_lock = threading.Lock()


class _FileLease(Lease):
    def __init__(self, key: tuple[str, str], fd: int | None) -> None:
        self.run_id = key[1]
        self._key = key
        self._fd = fd

    @classmethod
    def try_acquire(cls, ledger: Ledger, run_id: str) -> tuple[Lease | None, str]:
        database = ledger.engine.url.database
        if database in (None, "", ":memory:"):
            path = None  # a private in-memory ledger: only this process can write it
            key = (f"memory:{id(ledger)}", run_id)
        else:
            path = Path(database).resolve()
            key = (str(path), run_id)
        with _process_lock:
            if key in _process_held:
                return None, f"this process, pid {os.getpid()}"
            fd = None
            if path is not None:
                folder = path.parent / f"{path.name}-leases"
                folder.mkdir(exist_ok=True)
                lock_file = folder / f"{hashlib.sha256(run_id.encode()).hexdigest()[:32]}.lock"
                fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.read(fd, 200).decode(errors="replace").strip() or "?"
                    os.close(fd)
                    return None, holder
                os.ftruncate(fd, 0)
                os.pwrite(fd, _holder().encode(), 0)
            _process_held.add(key)
        return cls(key, fd), ""

    def release(self) -> None:
        with _process_lock:
            if self._key not in _process_held:
                return
            _process_held.discard(self._key)
            if self._fd is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
                os.close(self._fd)
                self._fd = None


# -- PostgreSQL: a fenced lease row ---------------------------------------------------------------


_NOW = "extract(epoch from clock_timestamp())::float8"
_TAKE = f"""
INSERT INTO run_leases (run_id, token, holder, expires_at)
VALUES (%(run_id)s, 1, %(holder)s, {_NOW} + %(ttl)s)
ON CONFLICT (run_id) DO UPDATE
   SET token = run_leases.token + 1, holder = excluded.holder, expires_at = excluded.expires_at
 WHERE run_leases.expires_at < {_NOW}
RETURNING token"""
_WHO = f"SELECT holder, expires_at - {_NOW}, token FROM run_leases WHERE run_id = %(run_id)s"
# a holder on this host whose process is gone is provably dead: its lease is taken at once
_TAKE_FROM_DEAD = ("UPDATE run_leases SET token = token + 1, holder = %(holder)s, expires_at = "
                   f"{_NOW} + %(ttl)s WHERE run_id = %(run_id)s AND token = %(token)s RETURNING token")
_RENEW = (f"UPDATE run_leases SET expires_at = {_NOW} + %(ttl)s "
          "WHERE run_id = %(run_id)s AND token = %(token)s RETURNING token")
_GIVE_UP = "UPDATE run_leases SET expires_at = 0 WHERE run_id = %(run_id)s AND token = %(token)s"


class _RowLease(Lease):
    def __init__(self, ledger: Ledger, run_id: str, token: int, ttl_s: float) -> None:
        self.run_id = run_id
        self.token = token
        self._ledger = ledger
        self._ttl = ttl_s
        self._renewed = time.monotonic()  # the last renewal the database confirmed
        self._lost: str | None = None
        self._stop = threading.Event()
        self._fenced: list[Ledger] = []
        self.attach(ledger)
        self._thread = threading.Thread(target=self._renew_until_stopped, name=f"lease-{run_id}", daemon=True)
        self._thread.start()

    def attach(self, ledger: Ledger) -> None:
        ledger.fence(self.run_id, self.token)
        self._fenced.append(ledger)

    @classmethod
    def try_acquire(cls, ledger: Ledger, run_id: str, ttl_s: float) -> tuple[Lease | None, str]:
        with ledger.engine.begin() as conn:
            token = conn.exec_driver_sql(_TAKE, {"run_id": run_id, "holder": _holder(), "ttl": ttl_s}).scalar()
            if token is None:
                holder, left, held = conn.exec_driver_sql(_WHO, {"run_id": run_id}).one()
                if _dead_here(holder):
                    token = conn.exec_driver_sql(_TAKE_FROM_DEAD, {"run_id": run_id, "holder": _holder(),
                                                                   "ttl": ttl_s, "token": held}).scalar()
            if token is None:
                return None, f"{holder}, whose lease runs {max(left, 0):.0f}s more unless it renews it"
        return cls(ledger, run_id, token, ttl_s), ""

    def _renew(self) -> bool:
        """True when the database confirmed this lease; False when it was taken over."""
        with self._ledger.engine.begin() as conn:
            ok = conn.exec_driver_sql(_RENEW, {"run_id": self.run_id, "token": self.token,
                                               "ttl": self._ttl}).scalar() is not None
        if ok:
            self._renewed = time.monotonic()
        else:
            self._lost = "another writer took it over"
        return ok

    def _renew_until_stopped(self) -> None:
        while not self._stop.wait(self._ttl / 3):
            try:
                if not self._renew():
                    return
            except Exception:  # the database unreachable for a moment: check() decides when that is too long
                pass

    def check(self) -> None:
        if self._lost is None and time.monotonic() - self._renewed > self._ttl / 2:
            # no confirmed renewal for a while (this process was paused, or the database was
            # unreachable): ask the database now rather than trust the lease
            try:
                self._renew()
            except Exception as exc:
                if time.monotonic() - self._renewed > self._ttl:
                    self._lost = f"it could not be renewed for {self._ttl:.0f}s ({type(exc).__name__})"
        if self._lost is not None:
            raise LeaseLost(self.run_id, f" ({self._lost})")

    def release(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        for ledger in self._fenced:
            ledger.fence(self.run_id, None)
        if self._lost is None:
            try:
                with self._ledger.engine.begin() as conn:
                    conn.exec_driver_sql(_GIVE_UP, {"run_id": self.run_id, "token": self.token})
            except Exception:
                pass  # the lease then ends by itself at its expiry


