"""The start of recording inside each Python process of a recorded program.

``firetitan-track record`` copies this file, as ``sitecustomize.py``, into a folder of its
own that it puts first on the program's ``PYTHONPATH``; ``autolog()`` does the same for
the processes its program starts. Python imports ``sitecustomize`` at start-up
(``site.py``), so every Python process of the program runs this: the program itself,
its ``subprocess`` children, ``multiprocessing`` spawn workers. It is the way
``opentelemetry-instrument`` starts its instrumentation.

It does three things, with the standard library only (it runs before the program's own
imports, in the program's environment):

1. runs the ``sitecustomize`` it shadows: Debian's Python ships one (``/usr/lib/python3.X``),
   and a user may have their own further along ``sys.path``;
2. when the process belongs to a recorded run (``FIRETITAN_RECORD_RUN`` is set), installs
   an import hook: when the program imports one of the SDK modules in ``WATCHED``, the
   module runs as usual and then ``firetitan_track.recording.patches`` wraps its public
   classes. A process that never imports the SDK never imports firetitan-track, so a
   helper process pays for one file read;
3. keeps the program's uncaught exception (``sys.excepthook``, chained) in the record
   folder, so ``record`` can say what the program failed with.

``record`` starts the program first and begins the run (RunStarted, ProgramStarted) beside
it, so the program's start does not wait on the ledger. The run's begin note (``begun.json``
in the record folder: the attempt, or why the run could not begin) tells each of the
program's processes that it may write: its first recorded call waits for it
(``wait_until_begun``), so nothing consequential is called before the run exists.

A process started with ``python -E`` or ``-I`` ignores ``PYTHONPATH`` and is not recorded.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import threading
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from types import ModuleType, TracebackType

ENV_RUN = "FIRETITAN_RECORD_RUN"  # the run the program's processes record into
ENV_LEDGER = "FIRETITAN_RECORD_LEDGER"  # its ledger URL
ENV_DIR = "FIRETITAN_RECORD_DIR"  # the recorder's folder: this file (boot/), notes for `record`
ENV_BEGINNER = "FIRETITAN_RECORD_BEGINNER"  # the pid of the process that begins the run (record, autolog)
METRICS_FILE_ENV = "COOKBOOK_METRICS_FILE"  # where the cookbook appends the metrics it logs
BOOT_MODULE = "_firetitan_record_boot"  # this module, as the recorder finds it again

# The modules whose classes the recorder wraps (patches.WRAPS says how).
WATCHED = (
    "fireworks.training.sdk.client",
    "fireworks.training.sdk.sampling",
    "fireworks.training.sdk.deployment",
    "fireworks.training.sdk.fireworks_client",
    "training.utils.checkpoints",
    "wandb.sdk.wandb_run",
    "wandb.sdk.lib.noop_run",
    "tinker.lib.public_interfaces.service_client",  # the tinker client (recording/tinker_patches.py)
    "tinker.lib.public_interfaces.training_client",
    "tinker.lib.public_interfaces.sampling_client",
    "tinker_cookbook.checkpoint_utils",
    "tinker_cookbook.utils.ml_log",
)

BEGUN_NOTE = "begun.json"
BEGIN_WAIT_S = 600.0  # the longest a recorded call waits for the run to begin (a slow ledger)

# the size of the metrics file when this process started: what it logs comes after
metrics_offset_at_start = 0


def started() -> ModuleType:
    """This process's boot module: the sitecustomize copy that ran at start-up, or this one
    (``autolog`` in a process ``record`` did not start)."""
    return sys.modules.get(BOOT_MODULE, sys.modules[__name__])


def note(kind: str, text: str) -> None:
    """Leave ``text`` for ``record`` in the record folder (``<kind>-<pid>.txt``)."""
    folder = os.environ.get(ENV_DIR)
    if not folder:
        return
    try:
        with open(os.path.join(folder, f"{kind}-{os.getpid()}.txt"), "a", encoding="utf-8") as out:
            out.write(text.rstrip("\n") + "\n")
    except OSError:
        pass


def mark_begun(folder: str, *, attempt: int | None = None, error: str | None = None) -> None:
    """Leave the run's begin note in ``folder``: the attempt, or the reason it did not begin."""
    import json

    tmp = os.path.join(folder, f".{BEGUN_NOTE}.{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as out:
        json.dump({"attempt": attempt} if error is None else {"error": error}, out)
    os.replace(tmp, os.path.join(folder, BEGUN_NOTE))  # whole or absent, never half-written


def wait_until_begun(timeout_s: float = BEGIN_WAIT_S) -> int:
    """The attempt this process records into, once the run has begun; waits for the begin
    note while the process beginning the run (``ENV_BEGINNER``) is alive. Raises RuntimeError
    with the reason when the run did not begin."""
    import json
    import time

    from firetitan_track.processes import pid_alive  # importable: the SDK's patches, its caller, are ours

    folder = os.environ.get(ENV_DIR) or ""
    path = os.path.join(folder, BEGUN_NOTE)
    beginner = int(os.environ.get(ENV_BEGINNER) or 0)
    deadline = time.monotonic() + timeout_s
    pause = 0.002
    while True:
        try:
            with open(path, encoding="utf-8") as f:
                found = json.load(f)
            break
        except FileNotFoundError:
            pass
        if beginner and not pid_alive(beginner):
            raise RuntimeError("the process recording this program ended before the run began")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the run did not begin within {timeout_s:.0f} s")
        time.sleep(pause)
        pause = min(pause * 2, 0.05)
    if found.get("error"):
        raise RuntimeError(f"the run could not begin: {found['error']}")
    return int(found["attempt"])


def _patch(name: str, module: ModuleType) -> None:
    try:
        from firetitan_track.recording import patches
    except Exception as exc:  # firetitan-track is not installed where the program runs
        _degraded(f"firetitan-track cannot be imported by {sys.executable}: {type(exc).__name__}: {exc}; "
                  "install it in the program's environment")
        return
    patches.patch_module(name, module)


_warned = False


def _degraded(reason: str) -> None:
    global _warned
    note("degraded", reason)
    if not _warned:
        _warned = True
        print(f"firetitan-track: recording degraded: {reason}; the program goes on", file=sys.stderr)


class _Loader(importlib.abc.Loader):
    """The module's own loader, then the recorder's patch."""

    def __init__(self, inner: importlib.abc.Loader, name: str):
        self._inner = inner
        self._name = name

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._inner.exec_module(module)
        module.__loader__ = self._inner  # the module keeps the loader it would have had
        _patch(self._name, module)

    def __getattr__(self, name: str) -> Any:  # get_source, get_resource_reader, ...: whatever the inner loader has
        return getattr(self._inner, name)


class PostImportHook(importlib.abc.MetaPathFinder):
    """Finds a watched module with the other finders and wraps its loader."""

    def __init__(self) -> None:
        self._finding = threading.local()

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in WATCHED or getattr(self._finding, fullname, False):
            return None
        setattr(self._finding, fullname, True)
        try:
            spec = None
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
        finally:
            setattr(self._finding, fullname, False)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _Loader(spec.loader, fullname)
        return spec


def install() -> None:
    """The import hook (once per process), and the patches for watched modules already imported."""
    if any(isinstance(f, PostImportHook) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, PostImportHook())
    for name in WATCHED:
        if name in sys.modules:
            _patch(name, sys.modules[name])


def _keep_uncaught_exceptions() -> None:
    previous = sys.excepthook

    def hook(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
        if value is not None and not isinstance(value, KeyboardInterrupt):
            note("exception", f"{kind.__name__}: {value}")
        previous(kind, value, tb)

    sys.excepthook = hook


def _run_shadowed_sitecustomize(here: str) -> None:
    """Import the next ``sitecustomize`` on sys.path after this one, as Python would have."""
    others = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", others)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["sitecustomize"] = module  # `import sitecustomize` gives the user's module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # as site.py does with a failing sitecustomize
        print(f"Error in sitecustomize; set PYTHONVERBOSE for traceback:\n{type(exc).__name__}: {exc}",
              file=sys.stderr)


def start(shadows: str | None) -> None:
    """What the sitecustomize does (``shadows``: its folder, whose sitecustomize it is)."""
    global metrics_offset_at_start
    sys.modules.setdefault(BOOT_MODULE, sys.modules[__name__])
    recording = bool(os.environ.get(ENV_RUN))
    if recording:
        try:
            metrics_offset_at_start = os.path.getsize(os.environ.get(METRICS_FILE_ENV) or "")
        except OSError:
            metrics_offset_at_start = 0
        install()
        _keep_uncaught_exceptions()
    if shadows is not None:
        _run_shadowed_sitecustomize(shadows)


if __name__ == "sitecustomize":  # copied into the boot folder and imported by site.py
    start(os.path.dirname(os.path.abspath(__file__)))
