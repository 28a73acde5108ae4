"""The local service's process supervisor: starting, finding and stopping the server process.

- ``start(state_dir, port, device)``: launch ``python -m runner.local.server`` in
  the background (its own session, output to ``<state_dir>/service.log``), wait
  until it answers, return its ``LocalServiceInfo``;
- ``running(state_dir)``: the info of a live service on that state dir, or None;
- ``ensure_running(state_dir)``: reuse a live one, else start one;
- ``stop(state_dir)``: SIGTERM, then SIGKILL after a grace period;
- ``local_service(...)``: a context manager that starts a service (in a fresh
  temporary state dir by default), yields its info and stops it on exit.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from firetitan_track.errors import UserError
from firetitan_track.extras import require
from firetitan_track.processes import pid_alive

from .state import DEFAULT_STATE_DIR, INFO_FILE, LOG_FILE, START_LOCK_FILE, TOKEN_ENV, read_json

READY_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class LocalServiceInfo:
    base_url: str
    base_model: str
    tokenizer_path: str
    training_shape_id: str
    pid: int
    state_dir: str = ""
    port: int = 0

    def public(self) -> dict:
        """The fields `local up` / `local info --json` print."""
        data = asdict(self)
        return {key: data[key] for key in ("base_url", "base_model", "tokenizer_path", "training_shape_id", "pid")}

    @classmethod
    def from_file(cls, data: dict) -> "LocalServiceInfo":
        return cls(base_url=data["base_url"], base_model=data["base_model"], tokenizer_path=data["tokenizer_path"],
                   training_shape_id=data["training_shape_id"], pid=int(data["pid"]),
                   state_dir=data.get("state_dir", ""), port=int(data.get("port", 0)))


class ServiceError(UserError, RuntimeError):
    """The service cannot start or be reached; the message says why."""


def _is_our_server(pid: int) -> bool:
    """Guard against pid reuse: only signal a process that runs our server module."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"runner.local.server" in f.read()
    except OSError:
        return pid_alive(pid)


def _servers_on(state_dir: Path) -> list[int]:
    """Live server processes started on ``state_dir``, found by their command line: one
    whose state dir was deleted under it has no info file left to name it."""
    wanted = str(Path(state_dir).resolve()).encode()
    pids = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"runner.local.server" in args and b"--state-dir" in args:
            i = args.index(b"--state-dir")
            if i + 1 < len(args) and args[i + 1] == wanted and pid_alive(int(entry.name)):
                pids.append(int(entry.name))
    return pids


def _healthy(base_url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{base_url}/local/v1/healthz", timeout=timeout) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def running(state_dir: Path | str = DEFAULT_STATE_DIR) -> LocalServiceInfo | None:
    """The live service on ``state_dir``, or None (a stale info file is ignored)."""
    data = read_json(Path(state_dir) / INFO_FILE)
    if not data or not pid_alive(int(data.get("pid", 0))) or not _healthy(data["base_url"]):
        return None
    return LocalServiceInfo.from_file(data)


def start(state_dir: Path | str = DEFAULT_STATE_DIR, port: int = 0, device: str = "cpu",
          timeout: float = READY_TIMEOUT_S, model_dirs: dict[str, str] | None = None, *,
          log_requests: bool = False, token: str | None = None) -> LocalServiceInfo:
    """Launch the server in the background and wait until it serves (``model_dirs``:
    {model name: checkpoint directory} to serve, the first as the default model;
    ``log_requests``: log every request, not only refused ones; ``token``: require it of
    every client, handed over in the environment so no process listing shows it)."""
    require("local")  # torch, transformers, the web stack: said before a server fails to import them
    state_dir = Path(state_dir).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    if running(state_dir) is not None:
        raise ServiceError(f"a local service is already running on {state_dir}")
    orphans = [pid for pid in _servers_on(state_dir) if pid != os.getpid()]
    if orphans:  # its files are gone, but a second server on the same dir would fight it
        raise ServiceError(f"a local service (pid {orphans[0]}) still runs on {state_dir}, though its files there "
                           f"are gone (the folder was deleted under it); stop it with `firetitan-track local down "
                           f"--state-dir {state_dir}`, then start again")
    (state_dir / INFO_FILE).unlink(missing_ok=True)  # stale, from a killed server
    repo_root = Path(__file__).resolve().parents[2]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo_root), env.get("PYTHONPATH")]))
    env.pop(TOKEN_ENV, None)
    if token:
        env[TOKEN_ENV] = token
    log_file = open(state_dir / LOG_FILE, "ab")
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "runner.local.server", "--state-dir", str(state_dir), "--port", str(port),
             "--device", device,
             *(arg for name, directory in (model_dirs or {}).items()
               for arg in ("--model-dir", f"{name}={Path(directory).expanduser().resolve()}")),
             *(["--log-requests"] if log_requests else [])],
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, env=env,
            start_new_session=True)  # survives the CLI that started it; `local down` stops it
    finally:
        log_file.close()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        exit_code = process.poll()
        if exit_code is not None:
            raise ServiceError(f"local service exited with code {exit_code} during start-up; see "
                               f"{state_dir / LOG_FILE}:\n{_log_tail(state_dir)}")
        data = read_json(state_dir / INFO_FILE)
        if data and int(data.get("pid", 0)) == process.pid and _healthy(data["base_url"], timeout=1.0):
            return LocalServiceInfo.from_file(data)
        time.sleep(0.05)
    process.kill()
    raise ServiceError(f"local service did not become ready within {timeout:.0f}s; see {state_dir / LOG_FILE}")


def _log_tail(state_dir: Path, lines: int = 20) -> str:
    try:
        return "\n".join((state_dir / LOG_FILE).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def ensure_running(state_dir: Path | str = DEFAULT_STATE_DIR, port: int = 0, device: str = "cpu",
                   model_dirs: dict[str, str] | None = None, *, log_requests: bool = False,
                   token: str | None = None) -> LocalServiceInfo:
    """The live service on ``state_dir``, started if there is none. A live one that
    does not serve every checkpoint in ``model_dirs`` is an error (it cannot take one on).

    Safe to call from several processes at once (sweep workers, parallel runs): a
    lock on the state dir makes the first start the service and the others use it.
    """
    state_dir = Path(state_dir)
    if running(state_dir) is None:
        require("local")  # before anything is written; a service some other environment runs serves all the same
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / START_LOCK_FILE, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        current = running(state_dir)
        if current is None:
            return start(state_dir, port=port, device=device, model_dirs=model_dirs, log_requests=log_requests,
                         token=token)
        running_info = read_json(state_dir / INFO_FILE) or {}
        if token and not running_info.get("token_required"):
            raise ServiceError(f"the local service on {state_dir} (pid {current.pid}) runs without a token; stop it "
                               "with `firetitan-track local down` and start it again with --token")
        served = running_info.get("model_dirs") or {}
        for name, directory in (model_dirs or {}).items():
            if served.get(name) != str(Path(directory).expanduser().resolve()):
                raise ServiceError(f"the local service on {state_dir} (pid {current.pid}) does not serve "
                                   f"--model-dir {name}={directory}; stop it with `firetitan-track local down` "
                                   "and start it again with the checkpoint")
        return current


def stop(state_dir: Path | str = DEFAULT_STATE_DIR, grace_s: float = 10.0) -> bool:
    """Stop the service on ``state_dir``; True if one was running."""
    state_dir = Path(state_dir)
    data = read_json(state_dir / INFO_FILE)
    if not data:
        orphans = _servers_on(state_dir)  # its state dir was deleted under it
        if not orphans:
            return False
        data = {"pid": orphans[0]}
    pid = int(data.get("pid", 0))
    if not pid or not pid_alive(pid) or not _is_our_server(pid):
        (state_dir / INFO_FILE).unlink(missing_ok=True)
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and pid_alive(pid):
        time.sleep(0.05)
    if pid_alive(pid):
        os.kill(pid, signal.SIGKILL)
        while pid_alive(pid):
            time.sleep(0.05)
    (state_dir / INFO_FILE).unlink(missing_ok=True)
    return True


def kill(state_dir: Path | str) -> None:
    """SIGKILL the service (tests use it to simulate a crash); leaves its files as they are."""
    data = read_json(Path(state_dir) / INFO_FILE)
    if data and pid_alive(int(data["pid"])) and _is_our_server(int(data["pid"])):
        os.kill(int(data["pid"]), signal.SIGKILL)
        while pid_alive(int(data["pid"])):
            time.sleep(0.02)


@contextlib.contextmanager
def local_service(state_dir: Path | str | None = None, port: int = 0, device: str = "cpu",
                  model_dirs: dict[str, str] | None = None, **options) -> Iterator[LocalServiceInfo]:
    """Start a local service for the duration of the block and yield its info.

    With no ``state_dir`` it runs in a temporary directory that is removed afterwards.
    """
    temporary = state_dir is None
    directory = Path(tempfile.mkdtemp(prefix="firetitan-local-")) if temporary else Path(state_dir)
    try:
        info = start(directory, port=port, device=device, model_dirs=model_dirs, **options)
        try:
            yield info
        finally:
            stop(directory)
    finally:
        if temporary:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":  # pragma: no cover - convenience for manual runs
    print(json.dumps(ensure_running().public()))
