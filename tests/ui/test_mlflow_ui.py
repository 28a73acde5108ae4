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
from tests.ui.pages import (close_assistant, differing_params, open_page, open_sweep_view, parallel_axes,
                            score_series)

EXPERIMENT = "firetitan-track"


def _trial_runs(served: ServedSweep) -> dict[str, str]:
    """Ledger run id -> MLflow run id of the sweep's trials, read through the API."""
    client = MlflowClient(tracking_uri=served.base_url)
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([exp.experiment_id], f"tags.sweep_id = '{SWEEP}'")
    return {r.data.tags["ledger_run_id"]: r.info.run_id for r in runs if "ledger_run_id" in r.data.tags}


def test_the_printed_link_shows_every_trials_score_curve_and_only_what_was_swept(
        served_sweep: ServedSweep, page, artifacts) -> None:
    trials = _trial_runs(served_sweep)
    assert sorted(trials) == [f"{SWEEP}-t0", f"{SWEEP}-t1"]
    assert served_sweep.printed_link.startswith(served_sweep.base_url)
    assert f"viewStateShareKey=sweep-{SWEEP}" in served_sweep.printed_link
    open_sweep_view(page, served_sweep.printed_link)

    # one chart, one series per trial: each trial's eval/score at every step it was scored
    ledger = Ledger.open(served_sweep.ledger_url)
    scored = {f"{SWEEP}-t{i}": [(ev.data["step"], ev.data["score"]) for ev in ledger.read(f"{SWEEP}-t{i}")
                                if ev.type == "EvalScored"] for i in (0, 1)}
    ledger.close()
    assert score_series(page) == scored
    # the plot is of what was swept against the score
    assert parallel_axes(page) == ["optim.learning_rate", "eval/score"]
    # and the trials differ, in their params, only in the swept key; their deployments (which do
    # differ) are tags
    assert differing_params(page) == {"optim.learning_rate": ["0.001", "0.003"]}
    client = MlflowClient(tracking_uri=served_sweep.base_url)
    runs = [client.get_run(trials[f"{SWEEP}-t{i}"]) for i in (0, 1)]
    assert [r.data.tags["model.deployment_id"] for r in runs] == ["dep-ui-t0", "dep-ui-t1"]
    assert all("model.deployment_id" not in r.data.params for r in runs)

    close_assistant(page)
    page.screenshot(path=str(artifacts / "sweep_view.png"), full_page=True)


def test_the_experiment_opens_on_training_runs(served_sweep: ServedSweep, page, artifacts) -> None:
    url = link(served_sweep.store, EXPERIMENT, served_sweep.base_url)  # what plain `ui` prints
    open_page(page, url, f"sweep {SWEEP}")
    assert re.search(r"#/experiments/\d+/runs", page.url), page.url
    nav = page.get_by_role("link", name="Models")
    assert nav.first.is_visible()  # the model-training side: Runs and Models, not GenAI traces
    assert page.get_by_text("Token Usage").count() == 0
    close_assistant(page)
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
    open_page(page, url, f"{SWEEP}-t0@step-{steps[-1]}")
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
        open_page(page, runs_page, run_id)
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
    open_page(page, link(served_sweep.store, experiment, served_sweep.base_url, run_id=run_id), "train/loss")
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
