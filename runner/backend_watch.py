"""A service that stops answering stops the run within tens of seconds.

The SDK waits on every trainer call by polling ``retrieve_future``, and it retries a
refused or dropped connection there without limit (backing off up to 30 s a try);
its control-plane calls retry for five minutes each. So a service that was killed
leaves the runner waiting, silently, for as long as anyone lets it.

``BackendWatch`` probes the service from a thread. Any HTTP answer, an error status
included, proves it alive; when nothing has answered for ``window_s`` the watch
stops the main thread the way a signal does, with ``BackendLost``, and the run goes
through its cleanup path (which then skips the calls it knows cannot answer).

Some SDK calls give up on a dead service sooner than the window: the run then fails
with that call's error before the watch has decided. ``settle`` decides at once, with
one probe, so such a run is recorded as a lost service too and its cleanup does not
wait a minute on calls that cannot answer.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from types import FrameType

__all__ = ["BackendLost", "BackendWatch", "DEFAULT_WINDOW_S", "unreachable"]

DEFAULT_WINDOW_S = 30.0  # long enough for a restart or a network blip, short enough to notice
_PROBE_TIMEOUT_S = 5.0
_SIGNAL = signal.SIGUSR1  # how the watch reaches the main thread where it waits


def unreachable(base_url: str | None, timeout_s: float = _PROBE_TIMEOUT_S) -> str | None:
    """Why nothing answers at ``base_url`` (None: something does). One probe, as the
    watch makes them: any HTTP answer, an error status included, counts."""
    import httpx

    try:
        httpx.get((base_url or "https://api.fireworks.ai").rstrip("/") + "/", timeout=timeout_s)
        return None
    except httpx.HTTPError as exc:
        return str(exc) or type(exc).__name__


class BackendLost(BaseException):
    """The service stopped answering. A BaseException, like a signal: the SDK's own
    ``except Exception`` blocks must not swallow it on its way out."""

    def __init__(self, base_url: str, silent_s: float, last_error: str):
        super().__init__(f"the service at {base_url} stopped answering ({last_error}; "
                         f"nothing for {silent_s:.0f} s)")
        self.base_url = base_url
        self.last_error = last_error


class BackendWatch:
    """Probes ``base_url`` every few seconds while a run drives it (see the module doc).

    ``window_s`` defaults to FIRETITAN_BACKEND_TIMEOUT_S, else DEFAULT_WINDOW_S.
    Only a watch started on the main thread can interrupt the run where it waits; on
    another thread (a sweep worker) it is checked at every step.
    """

    def __init__(self, base_url: str | None, *, window_s: float | None = None):
        self.base_url = (base_url or "https://api.fireworks.ai").rstrip("/")
        env = os.environ.get("FIRETITAN_BACKEND_TIMEOUT_S")
        self.window_s = window_s if window_s is not None else float(env) if env else DEFAULT_WINDOW_S
        self.interval_s = min(5.0, max(0.5, self.window_s / 6))
        self.lost: BackendLost | None = None
        self._last_answer = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._main = threading.current_thread() is threading.main_thread()
        self._old_handler: Any = None

    def start(self) -> "BackendWatch":
        if self._main:
            self._old_handler = signal.signal(_SIGNAL, self._raise)
        self._thread = threading.Thread(target=self._watch, name="firetitan-backend-watch", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop probing (before cleanup: a lost service is not reported twice)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=_PROBE_TIMEOUT_S + 1)
        if self._main and self._old_handler is not None:
            signal.signal(_SIGNAL, self._old_handler)
            self._old_handler = None

    def check(self) -> None:
        """Raise BackendLost if the service was found gone (a per-step check)."""
        if self.lost is not None:
            raise self.lost

    def settle(self) -> BackendLost | None:
        """Whether the service is lost, decided now (after ``stop``: the run has failed and
        is about to clean up). Lost when the watch found it so, or when one probe now gets
        no answer; None when the service answers."""
        if self.lost is None:
            why = unreachable(self.base_url)
            if why is not None:
                self.lost = BackendLost(self.base_url, time.monotonic() - self._last_answer, why)
        return self.lost

    def _raise(self, signum: int, frame: FrameType | None) -> None:
        if self.lost is not None:
            raise self.lost

    def _watch(self) -> None:
        import httpx

        with httpx.Client(timeout=_PROBE_TIMEOUT_S) as client:
            while not self._stop.wait(self.interval_s):
                try:
                    client.get(self.base_url + "/")
                    self._last_answer = time.monotonic()
                    continue
                except httpx.HTTPError as exc:
                    error = str(exc) or type(exc).__name__
                silent = time.monotonic() - self._last_answer
                if silent >= self.window_s and not self._stop.is_set():
                    self.lost = BackendLost(self.base_url, silent, error)
                    if self._main:
                        signal.pthread_kill(threading.main_thread().ident, _SIGNAL)
                    return
