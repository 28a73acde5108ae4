"""TrackedService in a researcher's own loop: the seed's code, plus two lines, is recorded."""

from __future__ import annotations

import asyncio
from pathlib import Path

import tinker  # Thinking Machines' tinker, as the seed imports it
import torch
from fireworks.training.sdk import Datum, FiretitanServiceClient, ModelInput, TensorData
from fireworks.training.sdk.concurrency import AdaptiveConcurrencyController
from transformers import AutoTokenizer

from firetitan_track import Ledger, track
from firetitan_track.projections.run_state import fold

from tests.helpers import cli, small_spec


def sft_datum(tokenizer, question: str, answer: str) -> Datum:
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           tokenize=True, return_dict=False)
    full = list(prompt) + list(tokenizer.encode(answer)) + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    weights = torch.zeros(len(full) - 1)
    weights[len(prompt) - 1:] = 1.0
    return Datum(model_input=ModelInput.from_ints(full[:-1]),
                 loss_fn_inputs={"target_tokens": TensorData.from_torch(torch.tensor(full[1:])),
                                 "weights": TensorData.from_torch(weights)})


def test_seed_loop_with_two_added_lines_is_recorded(local_info, ledger_url):
    info = local_info
    service = FiretitanServiceClient.from_firetitan_config(
        api_key="local", base_url=info.base_url, base_model="local/tiny-qwen3", tokenizer_model=info.tokenizer_path,
        lora_rank=0, training_shape_id="accounts/fireworks/trainingShapes/ts-local-tiny",
        deployment_id="seed-tracked", learning_rate=1e-3, replica_count=1, cleanup_trainer_on_close=True,
        cleanup_deployment_on_close="scale_to_zero")
    service = track(service, run_id="seed", ledger_url=ledger_url)  # the two added lines (with the import)
    tokenizer = AutoTokenizer.from_pretrained(info.tokenizer_path)
    training = service.create_training_client()

    def loss_fn(data, logprobs_list):
        loss = sum(-(lp * d.loss_fn_inputs["weights"].to_torch()).sum() for d, lp in zip(data, logprobs_list))
        return loss, {"nll": float(loss.detach())}

    data = [sft_datum(tokenizer, "reverse 123", "321")]
    for _ in range(3):
        training.forward_backward_custom(data, loss_fn).result()
        training.optim_step(tinker.AdamParams(learning_rate=1e-3)).result()  # TM's class, accepted
    saved = training.save_weights_for_sampler("step-3").result()
    sampler = service.create_deployment_sampler(model_path=saved.path, tokenizer=tokenizer,
                                                concurrency_controller=AdaptiveConcurrencyController())
    messages = [{"role": "user", "content": "reverse 123"}]
    completions = asyncio.run(sampler.sample_with_tokens(messages=messages, n=2, max_tokens=4, temperature=0.0))
    service.log_score(sum(c.text.startswith("321") for c in completions) / 2)  # optional: tie a score
    service.close()

    ledger = Ledger.open(ledger_url)
    events = ledger.read("seed")
    types = [ev.type for ev in events]
    assert types[:4] == ["RunStarted", "ProvisionRequested", "TrainerProvisioned", "DeploymentProvisioned"]
    assert events[2].data["created"] is True and events[3].data["created"] is True
    steps = [ev.data for ev in events if ev.type == "StepCompleted"]
    assert [s["step"] for s in steps] == [1, 2, 3]
    assert all(s["micro_batches"] == 1 and s["metrics"]["grad_norm"] > 0 for s in steps)
    assert steps[0]["optimizer"]["learning_rate"] == 1e-3
    snap = next(ev.data for ev in events if ev.type == "SnapshotSaved")
    assert (snap["step"], snap["kind"], snap["path"]) == (3, "base", saved.path)
    synced = next(ev.data for ev in events if ev.type == "WeightsSynced")
    assert synced["snapshot_path"] == saved.path and synced["deployment_id"] == "seed-tracked"
    scored = next(ev.data for ev in events if ev.type == "EvalScored")
    assert scored["snapshot_path"] == saved.path and scored["step"] == 3
    assert ledger.get_json(scored["prompt_set_digest"]) == [{"messages": messages}]
    recorded = ledger.get_json(next(ev.data for ev in events if ev.type == "SamplesRecorded")["completions_digest"])
    assert [c["text"] for c in recorded] == [c.text for c in completions]
    assert types[-1] == "CleanupApplied"
    assert events[-1].data == {"trainer": "deleted", "deployment": "scaled_to_zero"}
    st = fold(events)
    assert st.trainer_job_id and st.deployment_id == "seed-tracked" and st.last_score.score == scored["score"]


def test_api_key_never_reaches_ledger_blobs_logs_or_service_log(local_url, local_state_dir, ledger_url, tmp_path):
    secret = "fw_SECRET_do_not_store_7f3a9c21"
    spec = small_spec(tmp_path, local_url, name="secret", run={"steps": 2})
    proc = cli(ledger_url, "run", str(spec), "--run-id", "s", env={"FIREWORKS_API_KEY": secret})
    assert proc.returncode == 0, proc.stderr[-2000:]
    # a failing run's error text goes through redaction too
    bad = cli(ledger_url, "resume", "s", env={"FIREWORKS_API_KEY": secret})
    assert bad.returncode != 0 and "already completed" in bad.stderr
    db_file = Path(ledger_url.removeprefix("sqlite:///"))
    stored = b"".join(p.read_bytes() for p in db_file.parent.glob("ledger.db*") if p.is_file())
    assert secret.encode() not in stored
    assert secret not in proc.stdout + proc.stderr + bad.stdout + bad.stderr
    service_files = b"".join(p.read_bytes() for p in Path(local_state_dir).rglob("*.log"))
    assert secret.encode() not in service_files
    assert Ledger.open(ledger_url).read("s")[-1].type == "RunCompleted"  # the run used the key throughout


def test_recorder_recognises_its_own_events_committed_before_an_interrupt(ledger_url):
    """A Ctrl-C between the ledger's commit and the recorder seeing it must not turn the
    recorder's next write into a false conflict; a real second writer still is one."""
    import pytest

    from firetitan_track import ConcurrencyError
    from firetitan_track.events import CleanupApplied, RunCompleted, RunFailed, StepCompleted
    from firetitan_track.tracking import Recorder

    ledger = Ledger.open(ledger_url)
    rec = Recorder(ledger, "r", version=0)
    rec.record(RunFailed(error="x", step=0))
    rec.record(StepCompleted(step=1, data_cursor=None, micro_batches=1, metrics={}, optimizer={}), defer=True)
    # the commit happens, then the interrupt: the recorder never learns its new version
    ledger.append("r", list(rec._pending), expected_version=rec.version)
    rec.record(CleanupApplied(trainer="kept", deployment="kept"))
    assert [ev.type for ev in ledger.read("r")] == ["RunFailed", "StepCompleted", "CleanupApplied"]
    assert rec.version == 3

    other = Recorder(ledger, "r", version=3)
    other.record(RunCompleted(final_step=1, final_snapshot=None))
    with pytest.raises(ConcurrencyError):
        rec.record(RunCompleted(final_step=1, final_snapshot=None))


def test_a_deferred_event_waits_at_most_max_delay_and_defers_now_says_so_first(ledger_url):
    """``defer=True`` holds an event back until ``max_delay_s`` has passed since the first
    one waiting, then writes all that wait in one append; ``defers_now`` tells beforehand
    which of the two a record call will do (the ledger_scale simulator relies on it)."""
    import time

    from firetitan_track.events import StepCompleted
    from firetitan_track.tracking import Recorder

    def step(n: int) -> StepCompleted:
        return StepCompleted(step=n, data_cursor=None, micro_batches=1, metrics={}, optimizer={})

    ledger = Ledger.open(ledger_url)
    waits = Recorder(ledger, "long", version=0, max_delay_s=60.0)
    for n in (1, 2):
        assert waits.defers_now()
        assert waits.record(step(n), defer=True) is None
    assert ledger.stream_version("long") == 0  # nothing written yet
    assert waits.flush()[-1].version == 1

    short = Recorder(ledger, "short", version=0, max_delay_s=0.05)
    assert short.defers_now() and short.record(step(1), defer=True) is None
    time.sleep(0.1)
    assert not short.defers_now()
    written = short.record(step(2), defer=True)
    assert written is not None and written.version == 1  # both, in one append
    assert [ev.data["step"] for ev in ledger.read("short")] == [1, 2]

    at_once = Recorder(ledger, "zero", version=0, max_delay_s=0.0)
    assert not at_once.defers_now()
    assert at_once.record(step(1), defer=True).version == 0
