"""The MLflow UI over the project's tracking store: waiting for a server to answer."""

from __future__ import annotations

import time
import urllib.request


def wait_for_http(url: str, timeout: float = 60.0) -> None:
    """Wait until ``url`` answers 200 (a freshly started ``mlflow server``)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer within {timeout:.0f}s")
        time.sleep(0.25)