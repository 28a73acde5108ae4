"""The MLflow UI over the project's tracking store: links a person can open, and waiting for a server.

The links are MLflow 3's own routes (its UI is a hash-routed single page app):

- a sweep: a saved view of the experiment's runs (MLflow's "Views", shared by link), which
  the exporter writes for each sweep: its trials only (the parent left out, so they are
  not folded under it), in chart mode, with one section that shows the score curves of
  every trial on one chart (``eval/score`` against step), a parallel-coordinates plot of
  the swept params against ``eval/score``, and the trials' difference view (the params
  that differ, which are the swept ones: per-trial identifiers are tags, not params).
  A store exported before sweeps had views links to the runs comparison page
  (``#/compare-runs``) instead;
- a run: its run page; an experiment: its Training runs list.

Each carries ``workflowType=machine_learning``: MLflow 3.17 opens on its GenAI side
(traces, token usage) unless told, whatever the experiment's kind.

A saved view is an experiment tag ``mlflow.sharedViewState.<key>`` holding
``{name, createdAt, updatedAt, state}``, ``state`` being the UI's own JSON for the runs
page (search facets plus chart layout), as MLflow 3.17's "Save view" writes it; the
browser tests (tests/ui) check that this UI renders what is written here.
"""

from __future__ import annotations

import json
import re
import time
import urllib.parse
import urllib.request
from typing import TYPE_CHECKING

from firetitan_track.ledger import NotFound
from firetitan_track.projections.mlflow.keys import TAG_PARENT, TAG_RUN, TAG_SWEEP_PARENT, quote
from firetitan_track.projections.mlflow.store import resolve_tracking_uri, store_exists

if TYPE_CHECKING:  # mlflow is imported where it is used
    from mlflow import MlflowClient
    from mlflow.entities import Run

WORKFLOW = "workflowType=machine_learning"
VIEW_TAG_PREFIX = "mlflow.sharedViewState."  # the UI's saved views: one experiment tag each
SCORE = "eval/score"


def experiment_link(base_url: str, experiment_id: str) -> str:
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs?{WORKFLOW}"


def run_link(base_url: str, experiment_id: str, run_id: str) -> str:
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}?{WORKFLOW}"


def compare_link(base_url: str, experiment_id: str, run_ids: list[str]) -> str:
    query = urllib.parse.urlencode({"runs": json.dumps(run_ids, separators=(",", ":")),
                                   "experiments": json.dumps([experiment_id], separators=(",", ":"))})
    return f"{base_url.rstrip('/')}/#/compare-runs?{query}&{WORKFLOW}"


def view_link(base_url: str, experiment_id: str, key: str) -> str:
    return (f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs?viewStateShareKey={key}"
            f"&compareRunsMode=CHART&{WORKFLOW}")


def sweep_view_key(sweep_id: str) -> str:
    return f"sweep-{sweep_id}"  # sweep ids are plain (letters, digits, . _ -): safe in a tag key and a URL


def sweep_view(sweep_id: str, swept: list[str], created_ms: int) -> tuple[str, str]:
    """The experiment tag (key, value) of a sweep's saved view: its trials' score curves on
    one chart, the swept params against the score, and what the trials differ in."""
    section = f"firetitan-sweep-{sweep_id}"

    def chart(uuid: str, type: str, **fields: object) -> dict[str, object]:
        return {"uuid": f"{section}-{uuid}", "type": type, "metricSectionId": section, "isGenerated": False,
                "deleted": False, "runsCountToCompare": 100, **fields}  # (fields may name another section)

    state = {
        # the trials (they carry the sweep id and a ledger run id; the parent has no run id), listed
        # flat in trial order: MLflow folds children under their parent only when sorted by time
        "searchFilter": f"tags.sweep_id = {quote(sweep_id)} AND tags.{TAG_RUN} LIKE '%'",
        "orderByKey": "tags.`mlflow.runName`", "orderByAsc": True,
        "runsHiddenMode": "SHOW_ALL",  # every trial in the charts, not the UI's first ten
        "isAccordionReordered": True,  # this section stays first, above the generated ones
        "compareRunSections": [
            {"uuid": section, "name": f"sweep {sweep_id}", "display": True, "isReordered": True, "deleted": False,
             "isGenerated": False, "columns": 2, "cardHeight": 400},
            # the difference view has a column per trial: a section of its own, the full width
            {"uuid": f"{section}-differ", "name": f"sweep {sweep_id}: what the trials differ in", "display": True,
             "isReordered": True, "deleted": False, "isGenerated": False, "columns": 1, "cardHeight": 240}],
        "compareRunCharts": [
            chart("score", "LINE", metricKey=SCORE, selectedMetricKeys=[SCORE], displayName=f"{SCORE} by step",
                  lineSmoothness=0, xAxisKey="step", xAxisScaleType="linear", scaleType="linear", range={},
                  selectedXAxisMetricKey="", yAxisKey="metric", yAxisExpressions=[], ignoreOutliers=False,
                  useGlobalXaxisKey=False, useGlobalLineSmoothing=False),
            chart("params", "PARALLEL", selectedParams=list(swept), selectedMetrics=[SCORE], showAllRuns=True),
            chart("differ", "DIFFERENCE", metricSectionId=f"{section}-differ", compareGroups=["Parameters"],
                  chartName="the params that differ", showChangeFromBaseline=False, showDifferencesOnly=True,
                  baselineColumnUuid=""),
        ],
    }
    envelope = {"name": f"sweep {sweep_id}", "createdAt": created_ms, "updatedAt": created_ms,
                "state": json.dumps(state, sort_keys=True)}
    return VIEW_TAG_PREFIX + sweep_view_key(sweep_id), json.dumps(envelope, sort_keys=True)


def ui_base_url(tracking_uri: str, default: str = "http://127.0.0.1:5000") -> str:
    """Where the UI for a tracking store is: the server itself, or `firetitan-track ui`'s default."""
    return tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else default


def link(tracking_uri: str, experiment: str, base_url: str, *, sweep_id: str | None = None,
         run_id: str | None = None) -> str:
    """The page that shows a sweep's trials (its saved view), a ledger run, or else the experiment.

    Looked up in the tracking store as it is now: a run rebuilt after a resume is a new
    MLflow run, so a link made afterwards names the new one. NotFound when the store
    does not hold what was asked for.
    """
    from mlflow import MlflowClient

    tracking_uri = resolve_tracking_uri(tracking_uri)
    where = f"MLflow store {tracking_uri}, experiment {experiment!r}"
    if not store_exists(tracking_uri):
        raise NotFound(f"no {where}: `firetitan-track export mlflow` writes it")
    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise NotFound(f"no {where}: `firetitan-track export mlflow` writes it")
    exp_id = exp.experiment_id
    if sweep_id is not None:
        parents = client.search_runs([exp_id], f"tags.{TAG_SWEEP_PARENT} = {quote(sweep_id)}", max_results=1)
        trials = _search_all(client, exp_id, f"tags.`{TAG_PARENT}` = {quote(parents[0].info.run_id)}") \
            if parents else []
        if not trials:
            raise NotFound(f"sweep {sweep_id!r} has no trial runs in the {where}: "
                           "`firetitan-track export mlflow` writes them")
        if VIEW_TAG_PREFIX + sweep_view_key(sweep_id) in exp.tags:
            return view_link(base_url, exp_id, sweep_view_key(sweep_id))
        trials.sort(key=lambda r: _natural(r.data.tags.get(TAG_RUN, "")))
        return compare_link(base_url, exp_id, [r.info.run_id for r in trials])
    if run_id is not None:
        found = client.search_runs([exp_id], f"tags.{TAG_RUN} = {quote(run_id)}", max_results=1,
                                   order_by=["attributes.start_time DESC"])
        if not found:
            raise NotFound(f"run {run_id!r} is not in the {where}: `firetitan-track export mlflow {run_id}` "
                           "writes it")
        return run_link(base_url, exp_id, found[0].info.run_id)
    return experiment_link(base_url, exp_id)


def _search_all(client: MlflowClient, experiment_id: str, query: str) -> list[Run]:
    runs: list[Run] = []
    token: str | None = None
    while True:
        page = client.search_runs([experiment_id], query, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def _natural(name: str) -> list[int | str]:
    """``sw-t10`` after ``sw-t9``: trial run ids end in their trial number."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


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
