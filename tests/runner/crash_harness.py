"""Run the firetitan-track CLI and SIGKILL it at a chosen point (test-only).

The kill is real (the process dies without cleanup, exactly as on an OOM kill or a
lost machine); only the moment is chosen, by wrapping two functions from outside:

    CRASH_AT=event:StateSaved:2   after the 2nd StateSaved event is recorded
    CRASH_AT=midstep:3            inside step 3, after forward_backward, before optim_step
    CRASH_AT=before:ModelPromoted:1  just before the 1st ModelPromoted would be recorded
                                     (the service has answered; the ledger does not know)
    CRASH_AT=rollout:14           as async_grpo sends its 14th rollout (the ones before it
                                  in flight or returned: mid-sampling)

CRASH_SIGNAL=TERM sends a real SIGTERM instead, at the same point.

CRASH_WORKER_AT (same points) applies in a sweep's worker processes instead (they import
this file as ``__mp_main__``); with CRASH_WORKER_ONCE=FILE only the first worker to reach
the point dies (it creates FILE), so one worker is killed and the others run on.
"""

import os
import signal
import sys


def _die() -> None:
    once = os.environ.get("CRASH_WORKER_ONCE") if __name__ == "__mp_main__" else None
    if once:
        try:
            os.close(os.open(once, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return  # another worker died here already
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), getattr(signal, "SIG" + os.environ.get("CRASH_SIGNAL", "KILL")))


def _install(point: str) -> None:
    kind, *rest = point.split(":")
    if kind in ("event", "before"):
        from firetitan_track import tracking

        target, nth = rest[0], int(rest[1])
        original = tracking.Recorder.record
        seen = {"n": 0}

        def record(self, event, **kwargs):
            if event.type_name == target and kind == "before" and seen["n"] + 1 == nth:
                _die()
            ev = original(self, event, **kwargs)
            if event.type_name == target:
                seen["n"] += 1
                if seen["n"] == nth:
                    _die()
            return ev

        tracking.Recorder.record = record
    elif kind == "midstep":
        from firetitan_track import tracking

        step = int(rest[0])
        original = tracking.TrackedTrainingClient.optim_step

        def optim_step(self, params):
            if self._rec.step == step:
                _die()
            return original(self, params)

        tracking.TrackedTrainingClient.optim_step = optim_step
    elif kind == "rollout":
        from runner.recipes import async_grpo

        nth = int(rest[0])
        original = async_grpo._sample_one
        sent = {"n": 0}

        async def sample_one(*args, **kwargs):
            sent["n"] += 1
            if sent["n"] == nth:
                _die()
            return await original(*args, **kwargs)

        async_grpo._sample_one = sample_one
    else:
        raise SystemExit(f"bad CRASH_AT {point!r}")


if __name__ == "__mp_main__" and os.environ.get("CRASH_WORKER_AT"):  # a sweep's spawned worker
    _install(os.environ["CRASH_WORKER_AT"])

if __name__ == "__main__":
    if os.environ.get("CRASH_AT"):
        _install(os.environ["CRASH_AT"])
    from runner.cli import main

    main(prog_name="firetitan-track")
