"""The MLflow UI in a real browser: Debian's Chromium driven by Playwright, against a real
``firetitan-track ui`` (an ``mlflow server``) on a store exported from a real 2-trial sweep.

Everything here is session-wide and built once: the sweep (a tiny spec on the session's
local service), the served UI and the browser. Screenshots land in
``build/test-artifacts/ui`` (or ``$FIRETITAN_TEST_ARTIFACTS/ui``).
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.helpers import HARNESS, REPO, cli, small_spec
from tests.ui.pages import served_ui

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SWEEP = "ui-lr"


@dataclass
class ServedSweep:
    ledger_url: str
    store: str  # the sqlite tracking store the sweep exported to
    base_url: str  # the UI
    printed_link: str  # what `ui --sweep` printed before serving


@pytest.fixture(scope="session")
def artifacts() -> Path:
    root = Path(os.environ.get("FIRETITAN_TEST_ARTIFACTS", REPO / "build" / "test-artifacts")) / "ui"
    root.mkdir(parents=True, exist_ok=True)
    return root


@pytest.fixture(scope="session")
def served_sweep(local_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedSweep]:
    """A real 2-trial learning-rate sweep exported to MLflow, served by `firetitan-track ui --sweep`."""
    root = tmp_path_factory.mktemp("ui-sweep")
    ledger_url = f"sqlite:///{root / 'ledger.db'}"
    store = f"sqlite:///{root / 'mlflow.db'}"
    spec = small_spec(root, local_url, name="ui", run={"steps": 4})
    swept = cli(ledger_url, "sweep", str(spec), "--grid", "optim.learning_rate=1e-3,3e-3", "--sweep-id", SWEEP,
                "--tracking-uri", store, "--quiet")
    assert swept.returncode == 0, swept.stderr[-3000:]

    with open(root / "ui.log", "w") as log, served_ui(["--sweep", SWEEP, "--backend-store-uri", store], REPO, log,
                                                    prefix=[sys.executable, str(HARNESS), "--ledger", ledger_url]) \
            as (base_url, printed):
        yield ServedSweep(ledger_url, store, base_url, printed)


@pytest.fixture(scope="package")  # Playwright's sync API keeps its event loop running: end it with the UI tests
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One headless Chromium for the UI tests, with a fresh profile and nothing reaching out."""
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(f"no Chromium at {CHROMIUM}: `apt-get install -y chromium` (.ci/run does)")
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, viewport={"width": 1500, "height": 950},
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        context.set_default_timeout(90_000)  # a busy CI machine renders MLflow's pages slowly
        try:
            yield context
        finally:
            context.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    page = browser.new_page()
    yield page
    # each test starts from MLflow's defaults: the UI keeps its layout choices in local storage
    if page.url.startswith("http"):
        page.evaluate("() => { localStorage.clear(); sessionStorage.clear(); }")
    page.close()
