"""What a person sees in the MLflow UI, checked in a real browser (see conftest.py)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from typing import Any

from mlflow import MlflowClient

from firetitan_track import Ledger
from firetitan_track.projections.mlflow.ui import link
from tests.helpers import HARNESS, REPO
from tests.projections.streams import RunWriter
from tests.ui.conftest import SWEEP, ServedSweep

EXPERIMENT = "firetitan-track"


def _open(page: Any, url: str, ready: str) -> None:
    """Go to ``url`` and wait until ``ready`` shows: MLflow renders client-side."""
    page.goto(url)
    page.get_by_text(ready, exact=False).first.wait_for()


def _close_assistant(page: Any) -> None:
    """Fold MLflow's assistant panel away, for a screenshot of the page itself (it re-lays the page
    out, so read what a test checks before)."""
    close = page.get_by_role("button", name="Close", exact=True)
    if close.count():
        close.first.click()


def _trial_runs(served: ServedSweep) -> dict[str, str]:
    """Ledger run id -> MLflow run id of the sweep's trials, read through the API."""
    client = MlflowClient(tracking_uri=served.base_url)
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([exp.experiment_id], f"tags.sweep_id = '{SWEEP}'")
    return {r.data.tags["ledger_run_id"]: r.info.run_id for r in runs if "ledger_run_id" in r.data.tags}


def test_the_printed_link_shows_both_trials_their_learning_rates_and_scores(served_sweep: ServedSweep, page,
                                                                            artifacts) -> None:
    trials = _trial_runs(served_sweep)
    assert sorted(trials) == [f"{SWEEP}-t0", f"{SWEEP}-t1"]
    assert served_sweep.printed_link.startswith(served_sweep.base_url)
    _open(page, served_sweep.printed_link, "Comparing 2 Runs")
    page.get_by_text("eval/score", exact=True).first.wait_for()

    # each trial is a column, in trial order: its run id, learning rate and eval/score
    ids = [c for c in page.locator("tr", has_text="Run ID:").first.inner_text().split() if len(c) == 32]
    assert ids == [trials[f"{SWEEP}-t0"], trials[f"{SWEEP}-t1"]]
    lr = page.locator("tr", has=page.get_by_text("optim.learning_rate", exact=True)).first.inner_text()
    assert lr.split()[1:] == ["0.001", "0.003"]
    ledger = Ledger.open(served_sweep.ledger_url)
    latest = [[ev.data["score"] for ev in ledger.read(f"{SWEEP}-t{i}") if ev.type == "EvalScored"][-1]
              for i in (0, 1)]
    ledger.close()
    name, *scores = _grid_row(page.get_by_text("eval/score", exact=True).first)
    assert name == "eval/score"
    assert [float(s) for s in scores] == [round(x, 4) for x in latest] or all(
        abs(float(s) - x) < 1e-3 for s, x in zip(scores, latest)), (scores, latest)
    assert len(scores) == 2

    _close_assistant(page)
    page.get_by_role("switch", name="Parameters - Show diff only").click()  # what the trials differ in
    page.get_by_text("Visualizations", exact=True).click()  # folded: the table fits the screenshot
    page.screenshot(path=str(artifacts / "compare_sweep.png"), full_page=True)


def _grid_row(cell: Any) -> list[str]:
    """The texts of a row of MLflow's virtualised grid (absolutely placed cells), given its first cell."""
    return cell.evaluate("""a => {
        const first = a.closest('div[style*="top:"]');
        const top = 'top: ' + first.style.top;
        let grid = first.parentElement;
        while (grid && grid.querySelectorAll('div[style*="' + top + '"]').length < 3) grid = grid.parentElement;
        return Array.from(grid.querySelectorAll('div[style*="' + top + '"]')).map(d => d.innerText.trim());
    }""")


def test_the_experiment_opens_on_training_runs(served_sweep: ServedSweep, page, artifacts) -> None:
    url = link(served_sweep.store, EXPERIMENT, served_sweep.base_url)  # what plain `ui` prints
    _open(page, url, f"sweep {SWEEP}")
    assert re.search(r"#/experiments/\d+/runs", page.url), page.url
    nav = page.get_by_role("link", name="Models")
    assert nav.first.is_visible()  # the model-training side: Runs and Models, not GenAI traces
    assert page.get_by_text("Token Usage").count() == 0
    _close_assistant(page)
    page.screenshot(path=str(artifacts / "training_runs.png"))

    # ... and its Models: every snapshot by run and step, with the eval/score it reached
    nav.first.click()
    for name in (f"{SWEEP}-t0@step-0", f"{SWEEP}-t1@step-0"):
        page.get_by_text(name, exact=True).first.wait_for()
    page.get_by_text("eval/score", exact=True).first.wait_for()
    page.set_viewport_size({"width": 2300, "height": 520})  # wide enough for the score column
    page.screenshot(path=str(artifacts / "models.png"))


def test_a_run_page_shows_its_logged_models_with_their_scores(served_sweep: ServedSweep, page,
                                                              artifacts) -> None:
    ledger = Ledger.open(served_sweep.ledger_url)
    steps = sorted(ev.data["step"] for ev in ledger.read(f"{SWEEP}-t0") if ev.type == "SnapshotSaved")
    scores = {ev.data["step"]: ev.data["score"] for ev in ledger.read(f"{SWEEP}-t0") if ev.type == "EvalScored"}
    ledger.close()
    url = link(served_sweep.store, EXPERIMENT, served_sweep.base_url, run_id=f"{SWEEP}-t0")
    _open(page, url, f"{SWEEP}-t0@step-{steps[-1]}")
    assert page.get_by_text(f"Logged models ({len(steps)})").count() == 1
    for step in steps:
        row = page.locator("[role=row]", has_text=f"{SWEEP}-t0@step-{step}").first
        row.wait_for()
        # its eval/score beside its name (the grid fills metric cells in after the names)
        deadline = time.monotonic() + 60
        while f"{scores[step]:g}" not in (cells := row.inner_text().split()) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert f"{scores[step]:g}" in cells, cells
    page.get_by_text(f"Logged models ({len(steps)})").scroll_into_view_if_needed()
    page.screenshot(path=str(artifacts / "run_models.png"))


def test_a_followed_run_rebuilt_after_a_resume_replaces_its_predecessor(served_sweep: ServedSweep, page) -> None:
    """``export mlflow --follow`` while the UI is open: after a resume superseded exported
    steps, the UI shows the rebuilt run, once, and not the one it replaced."""
    run_id, experiment = "ui-followed", "ui-follow"
    client = MlflowClient(tracking_uri=served_sweep.base_url)
    ledger = Ledger.open(served_sweep.ledger_url)
    w = RunWriter(ledger, run_id)
    follower = subprocess.Popen(
        [sys.executable, str(HARNESS), "--ledger", served_sweep.ledger_url, "export", "mlflow", run_id,
         "--tracking-uri", served_sweep.base_url, "--experiment", experiment, "--follow", "--poll", "0.2", "--quiet"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        w.start()
        w.train(1, 4)
        w.step(5)
        old = _wait_for_run(client, experiment, run_id, lambda r: r.data.metrics.get("train/loss") == 1 / 5)
        exp_id = client.get_experiment_by_name(experiment).experiment_id
        runs_page = link(served_sweep.store, experiment, served_sweep.base_url)
        _open(page, runs_page, run_id)
        assert _run_links(page) == [old]

        w.resume()  # step 5 followed the last saved state: superseded, already shown
        w.loss_scale = 2.0
        w.train(5, 6)
        w.complete(6, f"snapshots/{run_id}/sampler-6")
        new = _wait_for_run(client, experiment, run_id, lambda r: r.info.status == "FINISHED")
    finally:
        follower.send_signal(signal.SIGTERM)  # how a person stops it (Ctrl-C alike): flush, then exit 0
        output, _ = follower.communicate(timeout=60)
        ledger.close()
    assert follower.returncode == 0, output
    assert new != old
    page.reload()
    page.get_by_text(run_id).first.wait_for()
    deadline = time.monotonic() + 60
    while _run_links(page) != [new] and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _run_links(page) == [new]
    _open(page, link(served_sweep.store, experiment, served_sweep.base_url, run_id=run_id), "train/loss")
    assert new in page.url and exp_id in page.url


def _run_links(page: Any) -> list[str]:
    """The MLflow run ids the runs list links to."""
    hrefs = page.locator("a[href*='/runs/']").evaluate_all("els => els.map(e => e.getAttribute('href'))")
    return sorted({m.group(1) for h in hrefs if (m := re.search(r"/runs/([0-9a-f]{32})", h or ""))})


def _wait_for_run(client: MlflowClient, experiment: str, run_id: str, ready, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        exp = client.get_experiment_by_name(experiment)
        runs = client.search_runs([exp.experiment_id], f"tags.ledger_run_id = '{run_id}'") if exp else []
        if len(runs) == 1 and ready(runs[0]):
            return runs[0].info.run_id
        time.sleep(0.3)
    raise AssertionError(f"MLflow never showed {run_id} as expected")


def test_compare_prints_the_link_ui_prints(served_sweep: ServedSweep) -> None:
    from tests.helpers import cli

    shown = cli(served_sweep.ledger_url, "compare", SWEEP, "--tracking-uri", served_sweep.store)
    assert shown.returncode == 0, shown.stderr[-2000:]
    # the same page; `compare` names the address `firetitan-track ui` serves by default
    assert served_sweep.printed_link.replace(served_sweep.base_url, "http://127.0.0.1:5000") in shown.stdout
