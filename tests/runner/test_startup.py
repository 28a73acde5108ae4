"""A run's start-up without the collector's passes (runner.startup): the attempt trains with
what it set up frozen, and hands the collector back as it found it, so only the moment a
piece of garbage is collected moves, never whether it is."""

from __future__ import annotations

import gc

import pytest

from runner.loop import run_spec
from runner.spec import load_spec
from runner.startup import gc_paused
from tests.helpers import small_spec


def test_an_attempt_trains_with_its_set_up_frozen_and_hands_the_collector_back(local_url, ledger_url, tmp_path):
    spec = load_spec(small_spec(tmp_path, local_url, run={"steps": 2}))
    during: list[tuple[bool, int]] = []

    def on_eval(step: int, score: float) -> None:
        during.append((gc.isenabled(), gc.get_freeze_count()))

    gc.unfreeze()  # what an earlier test's `run` command froze in this process (its attempt never began)
    assert gc.isenabled() and gc.get_freeze_count() == 0
    assert run_spec(spec, ledger_url=ledger_url, run_id="gc", progress=False, on_eval=on_eval).status == "completed"
    assert during and all(enabled and frozen > 0 for enabled, frozen in during)  # collecting, set-up skipped
    assert gc.isenabled() and gc.get_freeze_count() == 0  # everything is the collector's again


def test_gc_paused_leaves_the_collector_to_the_outermost_block_and_restores_it_on_an_error():
    assert gc.isenabled()
    with pytest.raises(KeyError):
        with gc_paused():
            with gc_paused():
                pass
            assert not gc.isenabled()  # the inner block did not switch it back on
            raise KeyError("boom")
    assert gc.isenabled()
