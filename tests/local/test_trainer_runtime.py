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


def test_a_forward_result_reads_the_same_to_the_sdk_as_protobuf_and_as_json(tmp_path):
    """The SDK asks for protobuf when it retrieves a forward(_backward) result; what it builds
    from those bytes must be what it builds from the JSON answer (values, shapes, metrics)."""
    import numpy as np
    import orjson
    import torch
    from fireworks.training.sdk._core.lib._pydantic_conv import deserialize_json_response
    from fireworks.training.sdk._core.proto.response_conv import deserialize_proto_response
    from fireworks.training.sdk.types import ForwardBackwardOutput

    from runner.local.engine import Datum, Trainer
    from runner.local.trainer_plane import forward_payload

    trainer = Trainer("local/tiny-qwen3", state_dir=tmp_path, seed=0)
    examples = [Datum(list(range(3, 3 + n)), {"target_tokens": torch.arange(4, 4 + n)}) for n in (7, 5, 6)]
    payload = forward_payload(trainer.forward_backward(examples, "cross_entropy"))
    from_proto = deserialize_proto_response(payload["_proto"](), ForwardBackwardOutput)
    from_json = deserialize_json_response(orjson.loads(orjson.dumps(payload["_json"]())), ForwardBackwardOutput)
    assert from_proto.loss_fn_output_type == from_json.loss_fn_output_type == "TensorData"
    assert from_proto.metrics == from_json.metrics and from_json.metrics["num_tokens:sum"] == 18.0
    assert len(from_proto.loss_fn_outputs) == len(from_json.loss_fn_outputs) == 3
    for got, want, n in zip(from_proto.loss_fn_outputs, from_json.loss_fn_outputs, (7, 5, 6)):
        a, b = got["logprobs"], want["logprobs"]
        assert (a.dtype, list(a.shape)) == (b.dtype, list(b.shape)) == ("float32", [n])
        assert np.array_equal(a.to_numpy(), b.to_numpy())
