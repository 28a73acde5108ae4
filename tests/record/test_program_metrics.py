"""A program's own metrics reach the record whatever number type its logger wrote the step as."""

from __future__ import annotations

import pytest

from firetitan_track.events import MetricsLogged, new_event
from firetitan_track.recording.metrics import ProgramMetrics


class _Session:
    """Takes what ProgramMetrics hands the recording session, as the event it becomes."""

    def __init__(self) -> None:
        self.logged: list[MetricsLogged] = []

    def metrics_logged(self, *, step, metrics, source) -> None:
        event = MetricsLogged(step=step, metrics=metrics, source=source)
        new_event(event)  # checked against its type, as the ledger's append checks it
        self.logged.append(event)


@pytest.mark.parametrize("written, recorded", [(3, 3), (3.0, 3), (2.5, None), ("3", None), (True, None),
                                               (None, None)])
def test_a_step_logged_as_a_whole_float_is_recorded_as_its_step(written, recorded) -> None:
    """A JSON metrics file may hold ``"step": 3.0``: before, the event refused the float and the
    program's metrics were not recorded; now it is step 3, and a step that is no whole number is none."""
    session = _Session()
    ProgramMetrics(session).from_call({"step": written, "loss": 0.5}, None, "metrics_file")
    assert [(e.step, e.metrics) for e in session.logged] == [(recorded, {"loss": 0.5})]
