"""The README's MLflow pictures, taken from the `make run` sweep itself: ``make screenshots``.

Reads the demo sweep (``demo-lr``) from the ledger ``make run`` leaves (``.firetitan/``),
exports it afresh into a temporary MLflow store (so the pictures show what the exporter
writes today), serves that with ``firetitan-track ui --sweep demo-lr`` and photographs, in
Debian's Chromium driven by Playwright:

- ``docs/img/mlflow_sweep.png``: the link ``ui --sweep`` prints: both trials' eval/score
  curves on one chart, the learning rate against the score, what the trials differ in;
- ``docs/img/mlflow_models.png``: the experiment's Models, every snapshot with its score.

Before each picture it checks the page shows what the ledger holds (the page helpers are
the browser tests', tests/ui/pages.py), and it refuses a sweep that is missing or
unfinished: run ``make run`` first.

    .venv/bin/python docs/screenshots.py [--sweep demo-lr] [--out docs/img]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the browser tests' page helpers

from firetitan_track import Ledger, NotFound  # noqa: E402
from firetitan_track.urls import default_ledger_url  # noqa: E402
from firetitan_track.ids import sweep_stream  # noqa: E402
from firetitan_track.projections.compare import compare_sweep  # noqa: E402
from firetitan_track.projections.mlflow import DEFAULT_EXPERIMENT, MlflowExporter  # noqa: E402
from firetitan_track.projections.mlflow.ui import link  # noqa: E402
from tests.ui.pages import (close_assistant, hide_view_banner, open_page, open_sweep_view,  # noqa: E402
                            score_series, served_ui)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", default="demo-lr")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "img")
    args = parser.parse_args()

    with Ledger.open(default_ledger_url()) as ledger, \
            tempfile.TemporaryDirectory(prefix="firetitan-screenshots-") as tmp:
        try:
            trials = compare_sweep(ledger, args.sweep)
        except NotFound:
            sys.exit(f"no sweep {args.sweep} in the ledger at {ledger.url}: run `make run` first")
        unfinished = [t.run_id for t in trials if t.status != "completed"]
        if unfinished or not trials:
            sys.exit(f"sweep {args.sweep} is not finished ({', '.join(unfinished) or 'no trials'}): run `make run` first")
        scored = {t.run_id: [(ev.data["step"], ev.data["score"]) for ev in ledger.read(t.run_id)
                             if ev.type == "EvalScored"] for t in trials}
        store = f"sqlite:///{tmp}/mlflow.db"
        MlflowExporter(ledger, store, run_ids=[sweep_stream(args.sweep), *scored]).export()
        with served_ui(["--sweep", args.sweep, "--backend-store-uri", store], REPO) as (base, sweep_link):
            _photograph(args, store, sweep_link, base, scored)
    best = {run_id: points[-1][1] for run_id, points in scored.items()}
    print(f"wrote {args.out / 'mlflow_sweep.png'} and {args.out / 'mlflow_models.png'} from sweep {args.sweep} "
          f"(last scores {best})")
    return 0


def _photograph(args: argparse.Namespace, store: str, sweep_link: str, base: str,
                scored: dict[str, list[tuple[int, float]]]) -> None:
    from playwright.sync_api import sync_playwright

    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile, sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, viewport={"width": 1400, "height": 1010},
            args=["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"])
        browser.set_default_timeout(90_000)
        page = browser.new_page()
        open_sweep_view(page, sweep_link)
        shown = score_series(page)
        if shown != scored:
            sys.exit(f"the sweep view shows {shown}, the ledger holds {scored}: not photographed")
        close_assistant(page)
        hide_view_banner(page)
        page.screenshot(path=str(args.out / "mlflow_sweep.png"))

        open_page(page, link(store, DEFAULT_EXPERIMENT, base), "Runs")
        page.get_by_role("link", name="Models").first.click()
        for run_id in scored:
            page.get_by_text(f"{run_id}@step-", exact=False).first.wait_for()
        page.get_by_text("eval/score", exact=True).first.wait_for()
        close_assistant(page)
        page.set_viewport_size({"width": 2300, "height": 620})  # wide enough for the score column
        page.screenshot(path=str(args.out / "mlflow_models.png"))
        browser.close()


if __name__ == "__main__":
    sys.exit(main())
