"""The metrics a recorded program logs itself, from where the cookbook writes them.

Two sources, both read in the program's own process:

- the metrics JSONL named by ``COOKBOOK_METRICS_FILE``, which the cookbook's
  ``log_metrics`` appends one object per call to (``record`` names one in its own folder
  when the program's environment names none). It is read from where it stood when the
  process started, by the process that provisioned the policy trainer (the one that knows
  what the deployment serves), before each weight sync and optimizer step and every
  half second;
- ``wandb.log`` (``wandb.sdk.wandb_run.Run.log``), wrapped after W&B's own handling, so it
  is recorded whether W&B is online, offline or disabled.

The cookbook's ``log_metrics`` sends one object to both, and some recipes log one number
to each sink separately: a number (name, step, value) seen in both is recorded once. What
is left becomes a MetricsLogged event with the snapshot loaded on the deployment when it
was read, so an ``eval/*`` score names the weights it measured: a line written before a
weight sync began is read before it. (``wandb.log`` also covers ``NoopRun.log``, W&B's
disabled mode.)
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections import Counter
from typing import TYPE_CHECKING, Mapping

from firetitan_track.blobs import canonical_json
from firetitan_track.recording import boot

if TYPE_CHECKING:
    from firetitan_track.recording.program import ProgramRecording

__all__ = ["ProgramMetrics"]

_MAX_LINE = 1 << 20  # a metrics line longer than this is not the cookbook's


def _numbers(obj: Mapping[str, object]) -> dict[str, float]:
    """The finite numbers of a logged object (lists, strings, NaN left out: nothing invented)."""
    out: dict[str, float] = {}
    for key, value in obj.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[str(key)] = value
    return out


class ProgramMetrics:
    """The program's own metrics, recorded once each, tied to what the deployment serves."""

    def __init__(self, session: ProgramRecording):
        self._session = session
        self._lock = threading.Lock()
        self._path: str | None = None
        self._offset = 0
        self._partial = b""
        self.reads_file = False  # this process provisioned the policy: it reads the metrics file
        self._seen: dict[str, Counter[str]] = {"metrics_file": Counter(), "wandb": Counter()}

    def poll(self) -> None:
        """Record the lines the metrics file gained since the last read."""
        if not self.reads_file:
            return
        path = os.environ.get(boot.METRICS_FILE_ENV)
        if not path:
            return
        with self._lock:
            if path != self._path:  # the first read starts where the file stood when the process did
                self._offset = boot.started().metrics_offset_at_start if self._path is None else 0
                self._path, self._partial = path, b""
            try:
                with open(path, "rb") as f:
                    f.seek(self._offset)
                    chunk = f.read()
            except FileNotFoundError:
                return
            self._offset += len(chunk)
            lines = (self._partial + chunk).split(b"\n")
            self._partial = lines.pop()  # a line being written is read next time
            if len(self._partial) > _MAX_LINE:
                self._partial = b""
            for raw in lines:
                try:
                    obj = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(obj, dict):
                    self._logged(obj.get("step"), obj, "metrics_file")

    def from_call(self, data: object, step: object, source: str) -> None:
        """Numbers the program handed a logger (``wandb``: ``wandb.log``; ``metrics_file``: a logger
        whose call writes the program's metrics file, as tinker-cookbook's ``JsonLogger``)."""
        if not isinstance(data, dict):
            return
        with self._lock:
            self._logged(step if step is not None else data.get("step"), data, source)

    def _logged(self, step: object, obj: Mapping[str, object], source: str) -> None:
        step = _step(step)
        other = self._seen["wandb" if source == "metrics_file" else "metrics_file"]
        mine = self._seen[source]
        metrics = {}
        for name, value in _numbers({k: v for k, v in obj.items() if k != "step"}).items():
            key = canonical_json([step, name, value])
            if other[key] > 0:  # the same number at the same step, already recorded from the other sink
                other[key] -= 1
                continue
            mine[key] += 1
            metrics[name] = value
        if len(mine) > 100_000:  # a sink the other never mirrors: forget what it said
            mine.clear()
        if metrics:
            self._session.metrics_logged(step=step, metrics=metrics, source=source)


def _step(value: object) -> int | None:
    """A logged step as MetricsLogged takes it: a whole number (a JSON file's ``3.0`` is step 3);
    anything else (a fraction, a string, a bool) is no step."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    return value
