"""What a person sees on MLflow's pages, read from a real browser page (Playwright), and the
``firetitan-track ui`` that serves them.

Shared by the browser tests (test_mlflow_ui.py) and the script that takes the README's
pictures (docs/screenshots.py), so the pictures show what the tests check.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any, Iterator

CARD = "[data-testid='experiment-view-compare-runs-card']"


@contextlib.contextmanager
def served_ui(ui_args: list[str], cwd: Path, log: IO[str] | int = subprocess.DEVNULL,
              prefix: list[str] | None = None) -> Iterator[tuple[str, str]]:
    """``firetitan-track [PREFIX] ui UI_ARGS --port N`` in its own process: yields the UI's base
    URL and the link the command printed before serving; stops it (as Ctrl-C would) after."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [*(prefix or [sys.executable, "-m", "runner.cli"]), "ui", *ui_args, "--port", str(port)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True, cwd=cwd)
    try:
        assert proc.stdout is not None
        proc.stdout.readline()  # "MLflow UI for <store>: <url>"
        printed = proc.stdout.readline().strip().removeprefix("open ")
        base_url = f"http://127.0.0.1:{port}"
        from firetitan_track.projections.mlflow import wait_for_http

        wait_for_http(f"{base_url}/health", timeout=120)
        yield base_url, printed
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def open_page(page: Any, url: str, ready: str) -> None:
    """Go to ``url`` and wait until ``ready`` shows: MLflow renders client-side."""
    page.goto(url)
    page.get_by_text(ready, exact=False).first.wait_for()


def close_assistant(page: Any) -> None:
    """Fold MLflow's assistant panel away, for a screenshot of the page itself (it re-lays the page
    out, so read what a test checks before)."""
    close = page.get_by_role("button", name="Close", exact=True)
    if close.count():
        close.first.click()


def hide_view_banner(page: Any) -> None:
    """Dismiss the "you're viewing a shared view" notice a saved view opens with (for a picture)."""
    hide = page.get_by_role("button", name="Hide banner")
    if hide.count():
        hide.first.click()


def open_sweep_view(page: Any, url: str) -> None:
    """Open a sweep's view (the link `ui --sweep` prints) and wait for its three charts."""
    open_page(page, url, "Parallel Coordinates")
    _wait(lambda: score_series(page), "the score chart never drew its series")


def sweep_cards(page: Any) -> list[Any]:
    """The view's first sections: the score curves, the parallel coordinates, the difference view."""
    cards = page.locator(CARD)
    return [cards.nth(i) for i in range(3)]


def score_series(page: Any) -> dict[str, list[tuple[float, float]]]:
    """The score chart's series: trial run -> [(step, score)], as plotted (MLflow draws a
    run's line and its markers as two traces of the same name)."""
    traces = sweep_cards(page)[0].locator(".js-plotly-plot").evaluate_all(
        "els => els.flatMap(g => (g.data || []).map(t => ({name: t.name, x: Array.from(t.x || []), "
        "y: Array.from(t.y || [])})))")
    return {t["name"]: list(zip(t["x"], t["y"])) for t in traces if t["name"]}


def parallel_axes(page: Any) -> list[str]:
    """The parallel-coordinates plot's axes, left to right (their titles; tick labels are numbers)."""
    text = sweep_cards(page)[1].inner_text().splitlines()
    return [line for line in text if line and line not in ("Parallel Coordinates", "Showing all runs")
            and not _number(line)]


def differing_params(page: Any) -> dict[str, list[str]]:
    """The difference view's rows under Parameters: key -> one value per trial, in trial order."""
    card = sweep_cards(page)[2]
    card.scroll_into_view_if_needed()  # the grid renders a card once it is in view
    rows = _wait(lambda: card.locator("[role=row]").all_inner_texts()[1:] and card.locator("[role=row]")
                 .all_inner_texts(), "the difference view never listed its rows")
    out = {}
    for row in rows[1:]:  # the header row names the runs
        cells = [c for c in row.splitlines() if c.strip()]
        if len(cells) > 1:
            out[cells[0]] = cells[1:]
    return out


def _number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _wait(check: Any, message: str, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found or time.monotonic() > deadline:
            assert found, message
            return found
        time.sleep(0.5)
