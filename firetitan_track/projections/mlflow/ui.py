"""The MLflow UI over the project's tracking store: links a person can open, and waiting for a server.

The links are MLflow 3's own routes (its UI is a hash-routed single page app):

- a sweep: the runs comparison page (``#/compare-runs``), its trial runs side by side
  with their params and metrics;
- a run: its run page; an experiment: its Training runs list.

Each carries ``workflowType=machine_learning``: MLflow 3.17 opens on its GenAI side
(traces, token usage) unless told, whatever the experiment's kind.
"""

from __future__ import annotations

import json
import re
import time
import urllib.parse
import urllib.request
from typing import Any

from firetitan_track.ledger import NotFound
from firetitan_track.projections.mlflow.keys import TAG_PARENT, TAG_RUN, TAG_SWEEP_PARENT, quote
from firetitan_track.projections.mlflow.store import resolve_tracking_uri, store_exists

WORKFLOW = "workflowType=machine_learning"


def experiment_link(base_url: str, experiment_id: str) -> str:
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs?{WORKFLOW}"


def run_link(base_url: str, experiment_id: str, run_id: str) -> str:
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}?{WORKFLOW}"


def compare_link(base_url: str, experiment_id: str, run_ids: list[str]) -> str:
    query = urllib.parse.urlencode({"runs": json.dumps(run_ids, separators=(",", ":")),
                                   "experiments": json.dumps([experiment_id], separators=(",", ":"))})
    return f"{base_url.rstrip('/')}/#/compare-runs?{query}&{WORKFLOW}"


def ui_base_url(tracking_uri: str, default: str = "http://127.0.0.1:5000") -> str:
    """Where the UI for a tracking store is: the server itself, or `firetitan-track ui`'s default."""
    return tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else default


def link(tracking_uri: str, experiment: str, base_url: str, *, sweep_id: str | None = None,
         run_id: str | None = None) -> str:
    """The page that shows a sweep's trials side by side, a ledger run, or else the experiment.

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


def _search_all(client: Any, experiment_id: str, query: str) -> list[Any]:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], query, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def _natural(name: str) -> list[Any]:
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
