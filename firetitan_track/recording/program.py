"""One process's recording of a program: the run it writes to, and what it knows so far.

Every Python process of a recorded program that makes a recorded SDK call gets one
``ProgramRecording``, made on its first such call from the environment ``record`` (or
``autolog``) set: the run id, the ledger URL, the record folder, the attempt. It holds:

- the run's writer (``Recorder`` with ``interleave``: the program's processes append to
  one run, each in its own order) and the ``CallRecorder`` that ``track()`` uses too;
- the optimizer steps requested so far (step k is the k-th optim_step, from 1, continued
  from the step a loaded state was saved at);
- the samples drawn here (``provenance.SampleIndex``), for matching trained data;
- the program's own metrics (``metrics.ProgramMetrics``).

Intents and outcomes of consequential calls are written at once (``now``): an intent is
durable before its call. Facts that no call waits on (samples, program metrics, completed
steps) are queued (``fact``) and written by a writer thread within half a second, or with
the next intent, in order; so a sampling coroutine never waits on the database.

A failure inside the recorder never reaches the program: it is reported once on stderr
and in the record folder, recorded as RecordingDegraded when the ledger still takes
events, and the call goes on untouched (``degraded``).
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, TypedDict, TypeVar

from firetitan_track.events import (CallFailed, Event, MetricsLogged, NewEvent, ProgramStarted, RecordedEvent,
                                    RecordingDegraded, RunResumed, SamplesDrawn, StateLoaded, StateSaved,
                                    StepCompleted, StepRequested, WeightsSynced, new_event)
from firetitan_track.ledger import Ledger
from firetitan_track.recording import boot
from firetitan_track.recording.metrics import ProgramMetrics
from firetitan_track.recording.provenance import SampleIndex, SampleRef, version_offsets
from firetitan_track.redact import redact_text
from firetitan_track.tracking import CallRecorder, Recorder, error_text, numeric

if TYPE_CHECKING:
    from firetitan_track.blobs import Json

__all__ = ["ProgramRecording", "PendingStep", "SampledSequence", "active", "configure"]

WRITE_EVERY_S = 0.5  # the longest a queued fact waits to be written
_MAX_QUEUED = 100_000  # facts kept while the ledger does not take them; older ones are dropped
T = TypeVar("T")


@dataclass
class PendingStep:
    """An optimizer step between its first micro-batch and its outcome."""

    trainer_job_id: str | None
    datums: int = 0
    sequences: list[str] = field(default_factory=list)  # digests of the datums' sampled sequences
    micro_batches: int = 0
    forward_backward: list[dict[str, float]] = field(default_factory=list)
    step: int | None = None  # set by its optim_step
    optimizer: dict[str, object] = field(default_factory=dict)
    matched: list[SampleRef] = field(default_factory=list)  # the samples its datums came from
    offsets: list[int] = field(default_factory=list)


class SampledSequence(TypedDict):
    """One sequence a sampling call drew, as a wrapper hands it to ``samples_drawn``."""

    full_tokens: list[int]  # the prompt and the completion
    prompt_len: int
    text: str | None
    finish_reason: str | None


class _ProgramRecorder(Recorder):
    """The run's writer, for a program: a write that fails degrades the recording instead of
    raising into the program (its events stay queued and go with the next write that works)."""

    def __init__(self, session: ProgramRecording, ledger: Ledger, run_id: str, version: int | None = None, *,
                 max_delay_s: float = 1.0, interleave: bool = False):
        super().__init__(ledger, run_id, version, max_delay_s=max_delay_s, interleave=interleave)
        self._session = session

    def record(self, event: Event, *, defer: bool = False, event_id: str | None = None) -> RecordedEvent | None:
        """Record after every fact the program's threads queued before it (order is causal)."""
        with self.lock:
            try:
                self._session.move_queued()
            except Exception as exc:
                self._session.degraded("storing queued blobs", exc)
            try:
                return super().record(event, defer=defer, event_id=event_id)
            except Exception as exc:
                self._session.degraded(f"recording {event.type_name}", exc)
                return None

    def flush(self) -> list[RecordedEvent]:
        try:
            return super().flush()
        except Exception as exc:
            with self.lock:
                if len(self._pending) > _MAX_QUEUED:
                    del self._pending[:len(self._pending) - _MAX_QUEUED]
            self._session.degraded("writing to the ledger", exc)
            raise


class ProgramRecording:
    """This process's part of a recorded program's run (see the module docstring)."""

    def __init__(self, *, run_id: str, ledger_url: str, attempt: int, record_dir: str | None = None):
        self.run_id = run_id
        self.attempt = attempt
        self.record_dir = record_dir
        self.degraded_reasons: list[str] = []
        self._warned = False
        self.ledger = Ledger.open(ledger_url)
        self.rec = _ProgramRecorder(self, self.ledger, run_id, interleave=True)
        self.calls = CallRecorder(self.rec, record_failures=True)
        self.samples = SampleIndex()
        self.metrics = ProgramMetrics(self)
        self.steps_requested = 0
        self.provisioned_here = False  # this process made the policy trainer (the program's trainer process)
        self.synced_here = False  # this process hot-loads the deployments it samples from
        # a Tinker program's sampler last used (deployment, snapshot): each sampling client holds
        # fixed weights, and the program's evals measured the one it last sampled from
        self.last_sampler: tuple[str, str | None] | None = None
        self._seen_version = 0  # how far this process has read the run's stream (what other processes did)
        self._this_attempt = False  # whether that reading has reached this attempt's ProgramStarted
        self._catch_up_lock = threading.Lock()
        self._facts: list[NewEvent] = []
        self._blobs: list[object] = []
        self._queue_lock = threading.Lock()
        self._closed = False
        self._stop = threading.Event()
        self._writer = threading.Thread(target=self._write_loop, name="firetitan-recorder", daemon=True)
        self._writer.start()
        atexit.register(self.close)

    # -- writing ----------------------------------------------------------------------------

    def now(self, event: Event, *, event_id: str | None = None) -> RecordedEvent | None:
        """Record an intent or outcome now, after every queued fact."""
        return self.rec.record(event, event_id=event_id)

    def fact(self, event: Event, *, event_id: str | None = None) -> None:
        """Queue a fact for the writer thread (checked against the catalogue now)."""
        try:
            new = new_event(event, event_id=event_id)
        except Exception as exc:
            self.degraded(f"recording {event.type_name}", exc)
            return
        with self._queue_lock:
            self._facts.append(new)

    def blob(self, obj: object) -> str:
        """The digest ``obj`` is stored under; stored by the writer before any event that names it."""
        from firetitan_track.blobs import json_digest

        digest = json_digest(obj)
        with self._queue_lock:
            self._blobs.append(obj)
        return digest

    def move_queued(self) -> None:
        """Store the queued blobs and hand the queued facts to the writer (its lock held). What
        the ledger does not take stays queued, in order, for the next write."""
        from firetitan_track.events import InvalidEvent

        with self._queue_lock:
            blobs, self._blobs = self._blobs, []
            facts, self._facts = self._facts, []
        try:
            while blobs:
                try:
                    self.ledger.put_json(blobs[0])
                except InvalidEvent as exc:  # this blob can never be stored: say so, keep the rest
                    self.degraded("storing a blob", exc)
                blobs.pop(0)
        except Exception:
            with self._queue_lock:
                self._blobs[:0] = blobs
                self._facts[:0] = facts
                del self._facts[:max(0, len(self._facts) - _MAX_QUEUED)]
            raise
        self.rec.queue(facts)

    def flush(self) -> None:
        with self.rec.lock:
            try:
                self.move_queued()
                self.rec.flush()
            except Exception:
                pass  # degraded already said why; the events wait for the next write

    def _write_loop(self) -> None:
        while not self._stop.wait(WRITE_EVERY_S):
            self.safely("reading the metrics file", self.metrics.poll)
            self.flush()

    def close(self) -> None:
        """At exit: the last metrics lines and every queued fact."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self.safely("reading the metrics file", self.metrics.poll)
        self.flush()

    # -- failures of the recorder --------------------------------------------------------

    def degraded(self, where: str, exc: BaseException | str) -> None:
        """Say once what could not be recorded; the program goes on."""
        reason = redact_text(f"{where}: {exc if isinstance(exc, str) else error_text(exc)}")
        if reason in self.degraded_reasons:
            return
        self.degraded_reasons.append(reason)
        boot.note("degraded", reason)
        if not self._warned:
            self._warned = True
            print(f"firetitan-track: recording degraded ({reason}); the program goes on", file=sys.stderr)
        if where != "writing to the ledger":
            self.fact(RecordingDegraded(reason=reason, pid=os.getpid()))

    def safely(self, where: str, fn: Callable[[], T]) -> T | None:
        try:
            return fn()
        except Exception as exc:
            self.degraded(where, exc)
            return None

    # -- what the program's calls add -------------------------------------------------------

    def next_step(self) -> int:
        self.steps_requested += 1
        self.rec.step = self.steps_requested
        return self.steps_requested

    def continue_from(self, step: int) -> None:
        """A loaded state (or the cookbook's resume) put the program at ``step``."""
        self.steps_requested = int(step)
        self.rec.step = self.steps_requested

    def catch_up(self) -> None:
        """Learn from the run's stream what the program's other processes recorded: the syncs
        they made (for a process that samples but does not sync, a rollout worker) and the samples
        they drew (for the process that trains on them)."""
        with self._catch_up_lock:
            try:
                events = self.ledger.read(self.run_id, from_version=self._seen_version)
            except Exception as exc:
                self.degraded("reading the run", exc)
                return
            for ev in events:
                match ev.fact:
                    case ProgramStarted(attempt=self.attempt):
                        self._this_attempt = True  # versions are counted within an attempt, as its trainer counts
                    case WeightsSynced() as synced if not self.synced_here:
                        key = synced.deployment_id or ""
                        self.calls.loaded[key] = synced.snapshot_path
                        if self._this_attempt:
                            self.calls.published[key] = self.calls.published.get(key, 0) + 1
                    case SamplesDrawn() as drawn:
                        self.samples.add(drawn.sequence_digests, event_id=ev.event_id, deployment=drawn.deployment,
                                         version_at_send=drawn.version_at_send)
            if events:
                self._seen_version = events[-1].version + 1

    def deployment_state(self, deployment: str) -> tuple[str | None, int]:
        """The snapshot ``deployment`` serves and the weight versions published to it, as far as
        this process knows (a process that makes no syncs of its own reads them from the run)."""
        if not self.synced_here:
            self.catch_up()
        return self.calls.loaded.get(deployment), self.calls.published.get(deployment, 0)

    def deployment_serving(self) -> str | None:
        """The deployment the program last hot-loaded: the one its evals sample."""
        served = [d for d, path in self.calls.loaded.items() if path is not None]
        return served[-1] if served else None

    def metrics_logged(self, *, step: int | None, metrics: dict[str, float], source: str) -> None:
        """The program's own numbers, tied to the weights its samples came from when it logged
        them: what its deployment serves, or for a Tinker program the sampler it last used."""
        if self.last_sampler is not None:
            deployment, snapshot = self.last_sampler
        else:
            deployment = self.deployment_serving()
            snapshot = self.calls.loaded.get(deployment) if deployment else None
        self.fact(MetricsLogged(step=step, metrics=metrics, source=source, snapshot_path=snapshot,
                                deployment=deployment, trainer_step=self.steps_requested))

    def step_sent(self, pending: PendingStep) -> None:
        """The intent of the next optimizer step (its first micro-batch is about to go)."""
        self.metrics.poll()
        self.now(StepRequested(step=self.steps_requested + 1, trainer_job_id=pending.trainer_job_id))

    def step_requested(self, pending: PendingStep, optimizer: dict[str, object]) -> None:
        """optim_step is called: number the step and measure how stale its data are."""
        pending.step = self.next_step()
        pending.optimizer = optimizer
        if any(self.samples.get(digest) is None for digest in pending.sequences):
            self.catch_up()  # drawn by another of the program's processes, perhaps
        published = dict(self.calls.published)
        for digest in pending.sequences:
            ref = self.samples.get(digest)
            if ref is not None:
                pending.matched.append(ref)
                pending.offsets.append(published.get(ref.deployment, 0) - ref.version_at_send)

    def step_completed(self, pending: PendingStep, response: object) -> None:
        provenance: dict[str, Json] = {"datums": pending.datums, "matched": len(pending.matched)}
        if pending.matched:
            provenance["samples_digest"] = self.blob([[ref.event_id, ref.index] for ref in pending.matched])
        offsets = version_offsets(pending.offsets)
        self.fact(StepCompleted(step=pending.step, data_cursor=None, micro_batches=pending.micro_batches,
                                metrics=numeric(getattr(response, "metrics", None)), optimizer=pending.optimizer,
                                trainer_job_id=pending.trainer_job_id, forward_backward=list(pending.forward_backward),
                                provenance=provenance, version_offsets=offsets or None))

    def call_failed(self, call: str, intent: type[Event], exc: BaseException, step: int | None = None) -> None:
        if isinstance(exc, Exception):
            self.now(CallFailed(call=call, intent=intent.type_name, error=error_text(exc),
                                step=self.rec.step if step is None else step))

    def samples_drawn(self, *, deployment: str, sent: tuple[str | None, int], call: str, prompt: object,
                      completions: list[SampledSequence], sampling: dict[str, Json],
                      returned: tuple[str | None, int] | None = None) -> None:
        """One sampling call. ``completions``: each sampled sequence as ``full_tokens`` (prompt and
        completion), ``prompt_len``, ``text`` and ``finish_reason``; ``returned``: the snapshot and
        versions when it returned (else what the deployment serves now, as far as this process knows)."""
        from firetitan_track.recording.provenance import sequence_digest

        sequences = [[int(t) for t in c["full_tokens"]] for c in completions]
        digests = [sequence_digest(seq) for seq in sequences]
        event_id = uuid.uuid4().hex
        stored = [{"text": c.get("text"), "finish_reason": c.get("finish_reason"),
                   "prompt_len": int(c["prompt_len"]), "completion_tokens": seq[int(c["prompt_len"]):]}
                  for c, seq in zip(completions, sequences)]
        if returned is None:
            returned = self.deployment_state(deployment)
        self.samples.add(digests, event_id=event_id, deployment=deployment, version_at_send=sent[1])
        # a process that trains nothing (a rollout worker) hands its samples to the trainer: they are
        # in the run before the call returns, so the trainer process finds them
        record = self.fact if self.provisioned_here else self.now
        record(SamplesDrawn(deployment=deployment, snapshot_at_send=sent[0], snapshot_at_return=returned[0],
                            version_at_send=sent[1], version_at_return=returned[1], prompt_digest=self.blob(prompt),
                            completions_digest=self.blob(stored), sequence_digests=digests, sampling=sampling,
                            step=self.steps_requested, call=call), event_id=event_id)

    def state_loaded(self, path: str, *, with_optimizer: bool, trainer_job_id: str | None) -> None:
        """DCP state loaded: when the run recorded its save, the program continues from that
        state's step; loaded in a later attempt, it resumes the run there (RunResumed supersedes
        the training history the earlier attempt recorded after that state)."""
        from firetitan_track.projections.run_state import TRAINING_HISTORY, authoritative

        self.flush()
        events = authoritative(self.ledger.read(self.run_id))
        saved = next((ev for ev in reversed(events)
                      if isinstance(ev.fact, StateSaved) and _names_state(path, ev.fact)), None)
        if saved is None:
            self.now(StateLoaded(path=path, with_optimizer=with_optimizer, trainer_job_id=trainer_job_id))
            return
        state = saved.fact
        assert isinstance(state, StateSaved)
        started = [ev.version for ev in events if isinstance(ev.fact, ProgramStarted)]
        this_attempt = started[-1] if started else 0
        if saved.version < this_attempt:
            superseded = [ev.version for ev in events
                          if saved.version < ev.version < this_attempt and ev.type in TRAINING_HISTORY]
            self.now(RunResumed(from_step=state.step, state_path=state.path, superseded=superseded,
                                attempt=self.attempt))
        self.continue_from(state.step)
        self.now(StateLoaded(path=path, with_optimizer=with_optimizer, trainer_job_id=trainer_job_id, step=state.step,
                             data_cursor=state.data_cursor))


def _names_state(path: str, saved: StateSaved) -> bool:
    """Whether a load of ``path`` loads the state ``saved`` recorded (by its path, or by its
    name inside a resolved or cross-job reference)."""
    if path == saved.path:
        return True
    tail = path.rstrip("/").rsplit("/", 1)[-1]
    return tail in (saved.path, saved.name)


# -- the process's recording ----------------------------------------------------------------

_session: ProgramRecording | None = None
_disabled = False  # the recording could not start in this process: every call passes through
_lock = threading.Lock()


def configure(*, run_id: str, ledger_url: str, attempt: int, record_dir: str | None) -> ProgramRecording | None:
    """Start this process's recording now (``autolog``), rather than from the environment."""
    global _session
    with _lock:
        if _session is None:
            try:
                _session = ProgramRecording(run_id=run_id, ledger_url=ledger_url, attempt=attempt,
                                            record_dir=record_dir)
            except Exception as exc:
                _give_up(f"cannot open the ledger {ledger_url}: {error_text(exc)}")
        return _session


def _give_up(reason: str) -> None:
    """This process records nothing more, and says why (once, on stderr and in the record folder)."""
    global _disabled
    _disabled = True
    reason = redact_text(reason)
    boot.note("degraded", reason)
    print(f"firetitan-track: recording degraded ({reason}); the program goes on", file=sys.stderr)


def active() -> ProgramRecording | None:
    """This process's recording, started on first use from the environment ``record`` set
    (waiting, the first time, for the run to begin: boot.wait_until_begun); None when the
    process is not recorded (or its recording could not start)."""
    if _session is not None or _disabled:
        return _session
    run_id = os.environ.get(boot.ENV_RUN)
    ledger_url = os.environ.get(boot.ENV_LEDGER)
    if not run_id or not ledger_url:
        return None
    with _lock:
        if _session is not None or _disabled:
            return _session
        try:
            attempt = boot.wait_until_begun()
        except Exception as exc:
            _give_up(f"recording run {run_id}: {exc}")
            return None
    return configure(run_id=run_id, ledger_url=ledger_url, attempt=attempt, record_dir=os.environ.get(boot.ENV_DIR))


def _forget_after_fork() -> None:
    """A forked child makes its own recording (its own connections, writer thread, queues)."""
    global _session, _disabled
    old, _session, _disabled = _session, None, False
    if old is not None:
        try:
            old.ledger.engine.dispose(close=False)  # the parent's connections stay the parent's
        except Exception:
            pass
        old._closed = True  # its atexit hook must not write the parent's queue from here


os.register_at_fork(after_in_child=_forget_after_fork)
