"""A trainer job's runtime (the trainer plane's worker and request ordering) without HTTP.

Work a handler submits ``after_response`` reaches the worker on the event loop's next turn,
after that handler's response is written; whatever is submitted meanwhile queues behind it,
so the worker still runs everything in submission (and seq_id) order.
"""

from __future__ import annotations

import asyncio

from runner.local.state import ServiceState
from runner.local.trainer_plane import TrainerRuntime, TrainerSpec


def test_work_held_for_the_response_reaches_the_worker_next_turn_and_in_order(tmp_path):
    ran: list[str] = []

    def work(name: str):
        return lambda trainer: ran.append(name) or {"ran": name}

    async def scenario():
        runtime = TrainerRuntime(TrainerSpec("job", "local/tiny-qwen3"), ServiceState(tmp_path), "cpu",
                                 asyncio.get_running_loop())
        model = runtime.new_model_id()
        try:
            # seq_id 2 first: held back for seq_id 1, then released with it.
            second = runtime.submit("second", work("second"), model_id=model, seq_id=2)
            first = runtime.submit("first", work("first"), model_id=model, seq_id=1, after_response=True)
            plain = runtime.submit("plain", work("plain"))  # same turn: queued behind the held work
            assert runtime._work.qsize() == 0  # nothing reached the worker during this turn
            results = [await runtime.wait(request_id, 120) for request_id in (first, second, plain)]
        finally:
            runtime.stop()
        return results

    results = asyncio.run(scenario())
    assert ran == ["first", "second", "plain"]
    assert results == [{"ran": "first"}, {"ran": "second"}, {"ran": "plain"}]
