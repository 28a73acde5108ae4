"""A recorded program's run: how it starts and how it ends in the ledger.

``record`` (the parent of the program) and ``autolog`` (inside it) both:

- ``begin``: start the run (RunStarted, once per run id) with the program's description
  as its spec (command line, working directory, entry script and its digest, the SDK
  releases, the backend), then ProgramStarted for this attempt. Recording into a run id
  again continues that run: attempt n+1 (after a crash, the cookbook resumes from its
  newest checkpoint, and the recorder supersedes what the crashed attempt did after it);
  a run the runner started is refused;
- ``end``: ProgramExited (finished, failed with its exception, or killed by a signal; its
  exit status) and, for every view that reads a run's status, RunCompleted or RunFailed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NotRequired, TypedDict

from firetitan_track.blobs import json_digest
from firetitan_track.errors import UserError
from firetitan_track.events import ProgramExited, ProgramStarted, RunCompleted, RunFailed, RunStarted
from firetitan_track.ledger import Ledger
from firetitan_track.projections.run_state import fold
from firetitan_track.redact import redact_text
from firetitan_track.tracking import Recorder, code_version

if TYPE_CHECKING:
    from typing import Unpack

    from firetitan_track.code_identity import PutBlob
    from firetitan_track.events import CodeIdentity

__all__ = ["ProgramRun", "ProgramSpec", "ProgramCode", "begin", "end", "describe_program", "program_code_fields",
           "NotARecordedRun"]

DEFAULT_BASE_URL = "https://api.fireworks.ai"  # what the SDK and the cookbook use when none is given


class NotARecordedRun(UserError):
    """The run id names a run the runner started; a program cannot record into it."""


class ProgramSpec(TypedDict):
    """What RunStarted's spec says of a recorded program, under its ``program`` key."""

    command: list[str]
    cwd: str
    python: str | None
    entry: dict[str, str]  # the entry script's path and sha256, its module, or its -c code's sha256
    sdk: dict[str, str]  # {distribution: release}
    backend: str


class ProgramCode(TypedDict):
    """RunStarted's code fields for a recorded program (``program_code_fields``)."""

    code_version: str
    entry: dict[str, str]
    code: NotRequired[CodeIdentity]


class _StartedFields(TypedDict, total=False):
    """What a caller of ``begin`` adds to ProgramStarted."""

    pid: int | None
    metrics_file: str | None


@dataclass
class ProgramRun:
    rec: Recorder
    attempt: int


def begin(ledger: Ledger, run_id: str, *, command: list[str], cwd: str, started_by: str,
          interpreter: str | None = None, **started: Unpack[_StartedFields]) -> ProgramRun:
    """Start (or continue) ``run_id`` for a program; ``started`` adds to ProgramStarted."""
    rec = Recorder(ledger, run_id, interleave=True)
    attempt = 1
    if rec.version > 0:
        st = fold(ledger.read(run_id), run_id)
        if st.program is None:
            raise NotARecordedRun(f"run {run_id!r} was started by `firetitan-track run` (it has a spec); record "
                                  "the program into a new run id, or continue that run with `firetitan-track resume`")
        attempt = st.program_attempts + 1
    else:
        code = program_code_fields(command, cwd, interpreter, put_blob=ledger.put_blob)
        spec = describe_program(command, cwd, code["entry"], interpreter)
        rec.record(RunStarted(spec=spec, spec_digest=json_digest(spec), code_version=code["code_version"],
                              code=code["code"], seed=None, backend=spec["program"]["backend"]))
    rec.record(ProgramStarted(attempt=attempt, command=list(command), cwd=cwd, started_by=started_by, **started))
    return ProgramRun(rec, attempt)


def end(run: ProgramRun, *, exit_status: int | None, record_dir: Path | None = None, pid: int | None = None,
        error: str | None = None, forwarded: str | None = None) -> None:
    """Record how the attempt ended: ``exit_status`` as ``subprocess`` reports it (negative:
    killed by that signal; None: unknown). The record folder holds what the program's
    processes left (boot.note): the uncaught exception of the process ``pid``, and what any
    of them could not record."""
    if record_dir is not None and pid is not None:
        error = error or _last_note(record_dir, "exception", pid)
        if error is not None and exit_status is None:
            exit_status = 1  # how Python exits on an uncaught exception
    degraded = _notes(record_dir, "degraded") if record_dir is not None else []
    rec = run.rec
    if exit_status is not None and exit_status < 0:
        outcome, signame = "killed", _signal_name(-exit_status)
        error = f"killed by {signame}" + (f" ({forwarded})" if forwarded else "")
    else:
        outcome, signame = ("finished" if not exit_status and error is None else "failed"), None
        if outcome == "failed" and not error:
            error = f"exited with status {exit_status}" + (f" ({forwarded})" if forwarded else "")
    rec.record(ProgramExited(attempt=run.attempt, outcome=outcome, exit_status=exit_status, signal=signame or None,
                             error=error or None, recording_degraded=list(degraded) or None))
    st = fold(rec.ledger.read(rec.run_id), rec.run_id)
    if outcome == "finished":
        rec.record(RunCompleted(final_step=st.step, final_snapshot=st.last_snapshot.path if st.last_snapshot else None))
    else:
        rec.record(RunFailed(error=error or outcome, step=st.step))


def _last_note(record_dir: Path, kind: str, pid: int) -> str | None:
    """The last note of ``kind`` the process ``pid`` left, redacted."""
    try:
        lines = [line for line in (record_dir / f"{kind}-{pid}.txt").read_text(errors="replace").splitlines()
                 if line.strip()]
    except OSError:
        return None
    return redact_text(lines[-1]) if lines else None


def _notes(record_dir: Path, kind: str) -> list[str]:
    """Every note of ``kind`` any of the program's processes left, redacted, each once."""
    found: list[str] = []
    for path in sorted(record_dir.glob(f"{kind}-*.txt")):
        for line in path.read_text(errors="replace").splitlines():
            text = redact_text(line.strip())
            if text and text not in found:
                found.append(text)
    return found


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


# -- what RunStarted says of a program -------------------------------------------------------------

def describe_program(command: list[str], cwd: str, entry: dict[str, str],
                     interpreter: str | None = None) -> dict[str, ProgramSpec]:
    """RunStarted's spec for a recorded program: ``{"program": {...}}``; ``entry`` is
    program_code_fields' (the entry script and its digest, read once)."""
    python = interpreter or python_of(command)
    # the service the program's environment names: the FireTitan SDK's, else the tinker client's
    base_url = os.environ.get("FIREWORKS_BASE_URL") or os.environ.get("TINKER_BASE_URL") or DEFAULT_BASE_URL
    return {"program": {
        "command": list(command), "cwd": cwd, "python": python,
        "entry": entry,
        "sdk": sdk_versions_of(python) if python else {},
        "backend": base_url,
    }}


def program_code_fields(command: list[str], cwd: str, python: str | None = None, *,
                        put_blob: PutBlob | None = None) -> ProgramCode:
    """RunStarted's code fields for a recorded program, built here and nowhere else:
    ``code_version``, the recorder's release; ``entry``, the program's entry script (or
    module, or ``-c`` code) with its sha256; and with ``put_blob`` (a ledger's, which stores
    the uncommitted diff) ``code``, the shared code identity (firetitan_track.code_identity)
    of the entry script's repository, or of ``cwd`` when the entry is no file."""
    entry = _entry(command, cwd, python or python_of(command))
    fields: ProgramCode = {"code_version": code_version(), "entry": entry}
    if put_blob is not None:
        from firetitan_track.code_identity import code_identity

        path = entry.get("path") or _module_file(entry.get("module"), cwd)
        is_file = path is not None and os.path.isfile(path)
        fields["code"] = code_identity(put_blob, [os.path.dirname(path) if is_file else cwd],
                                       entry=path if is_file else None, argv=list(command))
    return fields


def _module_file(module: str | None, cwd: str) -> str | None:
    """Where ``python -m module`` finds its file, looked up on the program's path (its working
    directory, then PYTHONPATH) without importing anything."""
    if not module:
        return None
    rel = module.replace(".", os.sep)
    for folder in [cwd, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]:
        for candidate in (os.path.join(folder, rel + ".py"), os.path.join(folder, rel, "__main__.py")):
            if os.path.isfile(candidate):
                return os.path.normpath(candidate)
    return None


_PYTHON = re.compile(r"python[0-9.]*$")
_OPTIONS_WITH_VALUE = ("-X", "-W", "--check-hash-based-pycs")


def python_of(command: list[str]) -> str | None:
    """The Python interpreter the command runs: itself, or a script's ``#!`` interpreter."""
    if not command:
        return None
    exe = shutil.which(command[0]) or command[0]
    if _PYTHON.match(os.path.basename(exe)):
        return exe
    try:
        with open(exe, "rb") as f:
            first = f.readline(512)
    except OSError:
        return None
    if not first.startswith(b"#!"):
        return None
    parts = first[2:].decode(errors="replace").split()
    if parts and os.path.basename(parts[0]) == "env":
        parts = [shutil.which(parts[1]) or parts[1]] if len(parts) > 1 else []
    return parts[0] if parts and _PYTHON.match(os.path.basename(parts[0])) else None


def _entry(command: list[str], cwd: str, python: str | None) -> dict[str, str]:
    args = list(command)
    via_python = python is not None and bool(args) and _PYTHON.match(os.path.basename(shutil.which(args[0]) or args[0]))
    if via_python:
        args = args[1:]
        while args and args[0].startswith("-") and args[0] != "-":
            option = args.pop(0)
            if option == "-m" and args:
                return {"module": args[0]}
            if option == "-c" and args:
                return {"code_sha256": hashlib.sha256(args[0].encode()).hexdigest()}
            if option in _OPTIONS_WITH_VALUE and args:
                args.pop(0)
    if not args:
        return {}
    path = args[0] if via_python else (shutil.which(args[0], path=os.environ.get("PATH")) or args[0])
    path = path if os.path.isabs(path) else os.path.join(cwd, path)
    try:
        with open(path, "rb") as f:
            return {"path": os.path.normpath(path), "sha256": hashlib.sha256(f.read()).hexdigest()}
    except OSError:
        return {"path": os.path.normpath(path)}


def sdk_versions_of(python: str) -> dict[str, str]:
    """The SDK releases installed where ``python`` runs ({} when it cannot say)."""
    probe = ("import json, importlib.metadata as m\nout = {}\nfor d in ('fireworks-ai', 'tinker'):\n"
             "    try: out[d] = m.version(d)\n    except m.PackageNotFoundError: pass\nprint(json.dumps(out))")
    try:
        done = subprocess.run([python, "-I", "-c", probe], capture_output=True, text=True, timeout=60)
        found = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else {}
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
        return {}
    return {str(k): str(v) for k, v in found.items()} if isinstance(found, dict) else {}


def running_python() -> list[str]:
    """This process's command line, as ``autolog`` records it."""
    return [sys.executable, *sys.argv]
