"""Chained runs: a run whose weights start from another run's saved state.

``model.init_from = "RUN_ID"`` starts from that run's last saved state, ``"RUN_ID@STEP"``
from its state at STEP (DPO after SFT is the usual chain). The upstream is resolved from
the ledger before anything is written: it must exist, be finished, and train the same
model with the same LoRA rank. RunStarted records it (run, status, state, step, the job
that saved it), so lineage names it and a resume that finds no state of its own starts
from the same place. The state is loaded by a cross-job reference, weights only: the
new run's optimizer starts fresh, as a new training phase does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from firetitan_track.errors import UserError
from firetitan_track.events import StateSaved, Upstream
from firetitan_track.ledger import Ledger
from firetitan_track.projections.run_state import authoritative, fold
from runner.spec import KeyCheck, ModelSection

if TYPE_CHECKING:
    from fireworks.training.sdk import FiretitanTrainingClient

    from firetitan_track.tracking import TrackedTrainingClient

__all__ = ["ChainError", "resolve_upstream", "load_upstream"]


class ChainError(UserError, ValueError):
    """A model.init_from that cannot be used; the message names this run's spec and the upstream."""


def resolve_upstream(ledger: Ledger, ours: ModelSection, bad: KeyCheck) -> Upstream | None:
    """The upstream state a spec's [model] (``ours``) starts from (None without model.init_from)."""
    ref = ours.init_from
    if not ref:
        return None
    run_id, _, at = ref.partition("@")
    where = f"{bad.source}: model.init_from = {ref!r}"
    events = ledger.read_or_empty(run_id)
    if not events:
        raise ChainError(f"{where}: the ledger holds no run {run_id!r}")
    st = fold(events, run_id)
    if st.status != "completed":
        raise ChainError(f"{where}: run {run_id} is {st.status} at step {st.step}, not finished; finish it "
                         f"(`firetitan-track resume {run_id}`) or start from another run")
    theirs = (st.spec or {}).get("model", {})
    for key, mine in (("base_model", ours.base_model), ("lora_rank", ours.lora_rank)):
        if theirs.get(key) != mine:
            raise ChainError(f"{where}: this run's model.{key} is {mine!r} but run {run_id}'s is "
                             f"{theirs.get(key)!r}; a run starts only from the same model and LoRA rank")
    states = [ev.fact for ev in authoritative(events) if isinstance(ev.fact, StateSaved)]
    if at:
        chosen = [saved for saved in states if saved.step == int(at)]
        if not chosen:
            steps = ", ".join(str(saved.step) for saved in states) or "none"
            raise ChainError(f"{where}: run {run_id} saved no state at step {at} (its states: steps {steps})")
        state = chosen[-1]
    elif states:
        state = states[-1]
    else:
        raise ChainError(f"{where}: run {run_id} saved no state to start from")
    return {"run_id": run_id, "status": st.status, "state_path": state.path, "state_name": state.name,
            "step": state.step, "trainer_job_id": state.trainer_job_id}


def load_upstream(policy: TrackedTrainingClient, reference: FiretitanTrainingClient | None,
                  upstream: Upstream, *, shared_reference: bool) -> None:
    """Load the upstream's weights into the policy (and into a separate frozen reference,
    so a DPO run after SFT measures itself against where it started)."""
    def load(client: TrackedTrainingClient | FiretitanTrainingClient) -> None:
        raw: FiretitanTrainingClient = getattr(client, "raw", client)
        path = raw.resolve_checkpoint_path(upstream["state_path"], source_job_id=upstream["trainer_job_id"])
        raw.load_state(path).result()

    load(policy)
    if reference is not None and not shared_reference:
        load(reference)
