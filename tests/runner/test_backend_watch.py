"""The backend watch: a service that stops answering stops the run within seconds.

Real sockets on loopback: a small HTTP server stands for a live service (any answer,
an error status included, proves it alive), a port nobody listens on for a dead one.
"""

from __future__ import annotations

import http.server
import socket
import threading
import time

import pytest

from runner.backend_watch import BackendLost, BackendWatch


@pytest.fixture
def live_url():
    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # an error status is an answer all the same
            self.send_error(404)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def dead_url() -> str:
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens on it
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_a_service_that_stops_answering_interrupts_the_main_thread_after_the_window(dead_url: str) -> None:
    watch = BackendWatch(dead_url, window_s=1.0).start()
    started = time.monotonic()
    try:
        with pytest.raises(BackendLost, match="stopped answering"):
            while time.monotonic() - started < 30:
                time.sleep(0.05)  # where the run waits on the SDK
    finally:
        watch.stop()
    assert 1.0 <= time.monotonic() - started < 10


def test_an_answering_service_is_never_lost(live_url: str) -> None:
    watch = BackendWatch(live_url, window_s=1.0).start()
    time.sleep(2.5)
    watch.stop()
    watch.check()  # raises if lost
    assert watch.settle() is None


def test_settle_decides_at_once_when_a_call_gave_up_before_the_window(dead_url: str) -> None:
    """A run whose SDK call failed fast on a dead service is recorded as a lost service, not
    sent into a cleanup that waits a minute on calls that cannot answer."""
    watch = BackendWatch(dead_url, window_s=300.0).start()
    watch.stop()
    started = time.monotonic()
    lost = watch.settle()
    assert isinstance(lost, BackendLost) and dead_url in str(lost)
    assert time.monotonic() - started < 5
    assert watch.settle() is lost  # decided once
