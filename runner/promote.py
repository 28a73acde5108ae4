"""Promotion: turn a run's sampler snapshot into a model, and keep in the run's record
which snapshot it was and which eval justified it.

``firetitan-track promote RUN (--snapshot PATH | --best) --model-id ID`` promotes through
the SDK's ``promote_checkpoint``. The run's stream gets PromotionRequested before the
call and ModelPromoted (or PromotionFailed) after it, so a crash between the two is
visible, and the next ``promote`` or ``resume`` of the run settles it by asking the
service whether the model exists. ``--best`` takes the snapshot with the highest eval
score (ties: the latest); a snapshot no eval scored is refused unless ``--force``;
promoting a snapshot again to the same model id changes nothing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import click

from firetitan_track import Ledger, sdk_adapter
from firetitan_track.errors import UserError
from firetitan_track.events import (ModelPromoted, PromotionFailed, PromotionRequested, Reconnected, RecordedEvent,
                                    SnapshotSaved, TrainerProvisioned)
from firetitan_track.projections.audit import EvalRow, eval_rows
from firetitan_track.projections.run_state import authoritative, fold
from firetitan_track.tracking import Recorder, error_text

if TYPE_CHECKING:
    from firetitan_track.blobs import Json

__all__ = ["Promotion", "PromotionError", "promote", "promotions", "resolve_pending", "promote_command"]


class PromotionError(UserError, RuntimeError):
    """A promotion that cannot be made; the message names the run, snapshot or model id."""


@dataclass
class Promotion:
    run_id: str
    snapshot_path: str
    model_id: str
    model: str  # the promoted model's resource name
    eval_id: str | None
    score: float | None
    already: bool = False  # promoted before: nothing was asked of the service this time

    def to_dict(self) -> dict[str, Json]:
        return asdict(self)


# -- reading the record --------------------------------------------------------------------


def promotions(events: list[RecordedEvent]) -> dict[str, list[str]]:
    """Snapshot path -> the model ids promoted from it, in the order they were promoted."""
    out: dict[str, list[str]] = {}
    for ev in events:
        if isinstance(promoted := ev.fact, ModelPromoted):
            out.setdefault(promoted.snapshot_path, []).append(promoted.model_id)
    return out


def _pending(events: list[RecordedEvent]) -> dict[str, PromotionRequested]:
    """PromotionRequested events with no outcome yet (the process died in between), by event id, as the
    fold has them."""
    return fold(events).pending_promotions


def _snapshot_jobs(events: list[RecordedEvent]) -> dict[str, str | None]:
    """Snapshot path -> the policy trainer job that saved it."""
    job: str | None = None
    out: dict[str, str | None] = {}
    for ev in authoritative(events):
        match ev.fact:
            case TrainerProvisioned(role="policy") | Reconnected(role="policy") as provisioned:
                job = provisioned.trainer_job_id
            case SnapshotSaved() as saved:
                out[saved.path] = job
    return out


# -- the service --------------------------------------------------------------------------


class _Service:
    """The control plane the run trained on (the local service is started if it is not up).

    Its answers stay ``dict[str, Any]``: the service's JSON as the SDK hands it over, read
    field by field."""

    def __init__(self, spec_dict: dict[str, Any], run_id: str):
        from fireworks.training.sdk import TrainerJobManager

        from runner.provision import api_key, endpoint
        from runner.spec import Spec

        spec = Spec.from_dict(spec_dict, source=f"run {run_id}")
        key = api_key(spec.backend)
        if key is None:
            raise PromotionError(f"run {run_id} trained on the managed service: promoting needs "
                                 "FIREWORKS_API_KEY in the environment")
        self.base_model = spec.model.base_model
        where = endpoint(spec.backend, spec.model.tokenizer, spec.bad)
        self.client = TrainerJobManager(api_key=key, base_url=where.base_url)

    def checkpoint_name(self, job_id: str, snapshot_path: str) -> str:
        """The 4-segment checkpoint resource the control plane lists for this snapshot."""
        for row in self.client.list_checkpoints(job_id):
            if row.get("name", "").rsplit("/", 1)[-1] == snapshot_path.rsplit("/", 1)[-1]:
                return row["name"]
        raise PromotionError(f"trainer job {job_id} lists no checkpoint for snapshot {snapshot_path!r}; "
                             "the service no longer holds it")

    def promote(self, name: str, model_id: str) -> dict[str, Any]:
        return self.client.promote_checkpoint(name=name, output_model_id=model_id, base_model=self.base_model)

    def model(self, model_id: str) -> dict[str, Any] | None:
        """The model as the service describes it, or None when it has no such model."""
        # the SDK has no public "get model" call; its REST helper sends the same auth headers
        resp = sdk_adapter.rest_get(self.client, f"/v1/accounts/{self.client.account_id}/models/{model_id}")
        if resp.status_code == 404:
            return None
        resp.raise_for_status()
        return resp.json()


# -- promotion --------------------------------------------------------------------------------


def resolve_pending(rec: Recorder, events: list[RecordedEvent], service: _Service | None = None,
                    spec_dict: dict[str, Any] | None = None) -> int:
    """Settle every promotion whose outcome was never recorded: ModelPromoted when the
    service has the model from that checkpoint, PromotionFailed otherwise. Returns how many."""
    pending = _pending(events)
    if not pending:
        return 0
    service = service or _Service(spec_dict or {}, rec.run_id)
    for request_id, asked in pending.items():
        model = service.model(asked.model_id)
        source = (model or {}).get("sourceCheckpoint", "")
        if model is not None and (not asked.checkpoint_id or source.endswith(f"/checkpoints/{asked.checkpoint_id}")):
            rec.record(ModelPromoted(request_id=request_id, snapshot_path=asked.snapshot_path, model_id=asked.model_id,
                                     model=model.get("name", asked.model_id), eval_id=asked.eval_id,
                                     score=asked.score, recovered=True))
        else:
            rec.record(PromotionFailed(request_id=request_id, snapshot_path=asked.snapshot_path,
                                       model_id=asked.model_id,
                                       error="the promoting process stopped before the service answered, "
                                             "and the service has no such model from this snapshot"))
    return len(pending)


def promote(run_id: str, *, ledger_url: str, model_id: str, snapshot: str | None = None, best: bool = False,
            force: bool = False, service: _Service | None = None) -> Promotion:
    """Promote a snapshot of ``run_id`` to ``model_id`` and record it in the run's stream."""
    from fireworks.training.sdk.fireworks_client import validate_output_model_id

    from firetitan_track.lease import acquire

    if (snapshot is None) == (not best):
        raise PromotionError("name the snapshot: --snapshot PATH or --best (one of them)")
    problems = validate_output_model_id(model_id)
    if problems:
        raise PromotionError(f"--model-id {model_id!r}: " + " ".join(p.strip().splitlines()[0] for p in problems))
    ledger = Ledger.open(ledger_url)
    with acquire(ledger, run_id):  # a run being written is promoted once it stops
        events = ledger.read(run_id)  # NotFound names the run
        st = fold(events, run_id)
        rec = Recorder(ledger, run_id, version=st.version)
        if _pending(events):
            service = service or _Service(st.spec or {}, run_id)
            resolve_pending(rec, events, service)
            events = ledger.read(run_id)

        path, row = _choose(run_id, events, snapshot, best)
        if row is None and not force:
            raise PromotionError(f"snapshot {path!r} of run {run_id} was never evaluated; promote it anyway "
                                 "with --force, or pick an evaluated one (--best)")
        for ev in events:
            if isinstance(done := ev.fact, ModelPromoted) and done.model_id == model_id:
                if done.snapshot_path == path:  # the same promotion again: nothing to do
                    return Promotion(run_id, path, model_id, done.model, done.eval_id, done.score, already=True)
                raise PromotionError(f"model id {model_id!r} was already promoted from snapshot "
                                     f"{done.snapshot_path!r} of run {run_id}; choose another id")

        job_id = _snapshot_jobs(events)[path]
        if job_id is None:  # a record whose snapshot no provisioning precedes (a partial or edited ledger)
            raise PromotionError(f"run {run_id}'s record names no trainer job before snapshot {path!r}, so the "
                                 "service cannot be asked for its checkpoint")
        service = service or _Service(st.spec or {}, run_id)
        name = service.checkpoint_name(job_id, path)
        eval_id, score = (row.eval_id, row.score) if row is not None else (None, None)
        request = rec.record(PromotionRequested(snapshot_path=path, model_id=model_id, eval_id=eval_id, score=score,
                                                trainer_job_id=job_id, checkpoint_id=name.rsplit("/", 1)[-1],
                                                forced=row is None))
        assert request is not None
        try:
            model = service.promote(name, model_id)
        except Exception as exc:
            rec.record(PromotionFailed(request_id=request.event_id, snapshot_path=path, model_id=model_id,
                                       error=error_text(exc)))
            raise PromotionError(f"promoting snapshot {path!r} of run {run_id} to {model_id!r} failed: "
                                 f"{error_text(exc)}") from None
        resource = model.get("name", model_id)
        rec.record(ModelPromoted(request_id=request.event_id, snapshot_path=path, model_id=model_id, model=resource,
                                 eval_id=eval_id, score=score))
        return Promotion(run_id, path, model_id, resource, eval_id, score)


def _choose(run_id: str, events: list[RecordedEvent], snapshot: str | None, best: bool) -> tuple[str, EvalRow | None]:
    """The snapshot to promote and the eval that justifies it (None: never evaluated)."""
    scored = [r for r in eval_rows(events) if r.score is not None]
    if best:
        if not scored:
            raise PromotionError(f"run {run_id} has no scored eval; --best needs one (or name --snapshot)")
        top = max(r.score for r in scored)
        row = [r for r in scored if r.score == top][-1]  # ties: the latest
        return row.snapshot_path, row
    assert snapshot is not None
    if snapshot not in _snapshot_jobs(events):
        raise PromotionError(f"run {run_id} has no snapshot {snapshot!r} in its history (see `firetitan-track "
                             f"audit {run_id}`)")
    mine = [r for r in scored if r.snapshot_path == snapshot]
    return snapshot, (mine[-1] if mine else None)


# -- the command --------------------------------------------------------------------------------


@click.command("promote")
@click.argument("run_id")
@click.option("--snapshot", "snapshot", metavar="PATH", default=None, help="The sampler snapshot to promote.")
@click.option("--best", is_flag=True, help="The snapshot with the highest eval score (ties: the latest).")
@click.option("--model-id", "model_id", required=True, help="The id of the model to create.")
@click.option("--force", is_flag=True, help="Promote a snapshot that no eval scored.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_context
def promote_command(ctx: click.Context, run_id: str, snapshot: str | None, best: bool, model_id: str,
                    force: bool, as_json: bool) -> None:
    """Promote a snapshot of RUN_ID to a model, recorded with the eval that justified it."""
    import json

    from firetitan_track.cli import ledger_url, user_errors

    with user_errors():
        p = promote(run_id, ledger_url=ledger_url(ctx), model_id=model_id, snapshot=snapshot, best=best,
                    force=force)
    if as_json:
        click.echo(json.dumps(p.to_dict(), indent=2))
        return
    why = "never evaluated (--force)" if p.score is None else f"eval {p.eval_id} scored {p.score:.3f}"
    verb = "already promoted" if p.already else "promoted"
    click.echo(f"{verb}: {p.snapshot_path} -> {p.model} ({why})")
