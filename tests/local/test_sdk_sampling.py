"""The deployment as the SDK's DeploymentSampler sees it: the SSE wire shape, greedy
and seeded sampling, stop and max_tokens, batching of concurrent requests, the
prefill-queue signal that makes the AdaptiveConcurrencyController move its window,
and server metrics that are each measured (or absent), never constants."""

from __future__ import annotations

import asyncio

import orjson
import pytest
from fireworks.training.sdk.concurrency import AdaptiveConcurrencyController


@pytest.fixture
def deployment(provision):
    service = provision()
    service.create_training_client()
    return service


def _sampler(service, tokenizer, controller=None):
    return service.create_deployment_sampler(tokenizer=tokenizer, concurrency_controller=controller)


def test_streamed_completion_wire_shape(deployment, http):
    body = {"model": f"accounts/local/deployments/{deployment.deployment_id}", "prompt": [104, 105], "max_tokens": 5,
            "temperature": 0.0, "stream": True, "raw_output": True, "perf_metrics_in_response": True, "logprobs": True}
    with http.stream("POST", "/inference/v1/completions", json=body) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in resp.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    final = chunks[-1]
    choice = final["choices"][0]
    assert choice["finish_reason"] in ("stop", "length")
    completion_ids = choice["raw_output"]["completion_token_ids"]
    assert choice["raw_output"]["prompt_token_ids"] == [104, 105]
    assert 1 <= len(completion_ids) <= 5
    assert final["usage"] == {"prompt_tokens": 2, "completion_tokens": len(completion_ids),
                              "total_tokens": 2 + len(completion_ids)}
    assert float(final["perf_metrics"]["prefill-queue-duration"]) >= 0.0
    token_entries = [entry for chunk in chunks[:-1] for entry in chunk["choices"][0]["logprobs"]["content"]]
    assert [entry["token_id"] for entry in token_entries] == completion_ids
    # Greedy: the model's logprob, and 0 for the distribution sampled from (all its mass on the argmax).
    assert all(entry["logprob"] <= 0.0 and entry["sampling_logprob"] == 0.0 for entry in token_entries)
    # The non-streamed form carries the same content in one body.
    plain = http.post("/inference/v1/completions", json={**body, "stream": False}).json()
    assert plain["choices"][0]["raw_output"]["completion_token_ids"] == completion_ids


def test_greedy_seeded_stop_and_max_tokens(deployment, tokenizer):
    sampler = _sampler(deployment, tokenizer)
    prompt = [104, 101, 108, 108, 111]

    async def sample(**kwargs):
        return (await sampler.sample_with_prompt_tokens(prompt, n=1, **kwargs))[0]

    async def run():
        greedy = [await sample(max_tokens=8, temperature=0.0) for _ in range(2)]
        seeded = [await sample(max_tokens=8, temperature=1.0, seed=seed) for seed in (11, 11, 12)]
        short = await sample(max_tokens=3, temperature=1.0, seed=5)
        return greedy, seeded, short

    greedy, seeded, short = asyncio.run(run())
    assert greedy[0].full_tokens == greedy[1].full_tokens
    assert seeded[0].full_tokens == seeded[1].full_tokens != seeded[2].full_tokens
    assert short.completion_len <= 3
    if short.completion_len == 3:
        assert short.finish_reason == "length"
    # A stop string taken from the greedy output ends the completion right after it.
    completion = greedy[0].full_tokens[len(prompt):]
    stop_token = next((t for t in completion[1:] if t < 128 and t not in completion[:1]), None)
    assert stop_token is not None, completion  # the seeded base model's greedy output is fixed
    stopped = asyncio.run(sample(max_tokens=8, temperature=0.0, stop=[chr(stop_token)]))
    cut = completion.index(stop_token) + 1
    assert stopped.full_tokens[len(prompt):] == completion[:cut]
    assert stopped.finish_reason == "stop"


def test_concurrent_requests_are_batched_and_report_queue_wait(deployment, tokenizer):
    controller = AdaptiveConcurrencyController(initial_window=16, adjustment_interval=0)
    sampler = _sampler(deployment, tokenizer, controller)

    async def burst():
        return await sampler.sample_with_prompt_tokens([104, 105], n=16, max_tokens=16, temperature=1.0)

    completions = asyncio.run(burst())
    assert len(completions) == 16
    metrics = sampler.drain_metrics()
    assert len(metrics) == 16
    waits = [m.prefill_queue_duration for m in metrics]
    assert all(w is not None and w >= 0 for w in waits)
    # Requests that arrived while a batch was generating waited for it, then ran together.
    assert max(waits) > 0.0
    assert max(m.num_concurrent_requests for m in metrics) > 1


def test_adaptive_controller_window_grows_and_shrinks(deployment, tokenizer):
    controller = AdaptiveConcurrencyController(initial_window=4, adjustment_interval=4, prefill_queue_target=0.02)
    sampler = _sampler(deployment, tokenizer, controller)

    seen: list[int] = []  # the window after each completion

    async def one(max_tokens, delay=0.0):
        await asyncio.sleep(delay)
        await sampler.sample_with_prompt_tokens([104, 105], n=1, max_tokens=max_tokens, temperature=1.0)
        seen.append(controller.window_size)

    async def sequential():  # no queueing: the window grows
        for _ in range(8):
            await one(2)

    async def burst():  # long requests arriving while a batch generates: they queue, the window shrinks
        # (arrivals are staggered: requests that all arrive together would share one batch and never wait)
        await asyncio.gather(*(one(48, delay=0.004 * i) for i in range(48)))

    start = controller.window_size
    asyncio.run(sequential())
    grown = controller.window_size
    seen.clear()
    asyncio.run(burst())
    assert grown > start, (start, grown)
    # AIMD: once the queue is past the target the window halves; a smaller window then
    # queues less and it grows again, so the burst's lowest window is what shows the shrink
    assert min(seen) < grown, (grown, seen)


def test_server_metrics_are_measured_or_absent(deployment, tokenizer):
    """Each perf_metrics figure is this request's own measurement: the timings fit
    together (queue + prefill <= time to first token <= processing time), vary with
    the load, and what nothing measures (a generation queue, a prompt cache) is absent."""
    sampler = _sampler(deployment, tokenizer, AdaptiveConcurrencyController(initial_window=16, adjustment_interval=0))

    async def burst():
        return await asyncio.gather(
            sampler.sample_with_prompt_tokens([104, 105], n=12, max_tokens=6, temperature=1.0),
            sampler.sample_with_prompt_tokens([104, 105, 106], n=1, max_tokens=1, temperature=1.0))

    many, [one] = asyncio.run(burst())
    metrics = sampler.drain_metrics()
    assert len(metrics) == 13
    for m in metrics:
        assert m.generation_queue_duration is None and m.cached_prompt_tokens is None
        assert m.prompt_tokens in (2, 3)
        assert 0 <= m.prefill_queue_duration <= m.server_ttft <= m.server_processing_time
        assert m.prefill_duration > 0 and m.generation_duration >= 0
        assert m.server_ttft + m.generation_duration <= m.server_processing_time + 1e-6
    single = next(m for m in metrics if m.prompt_tokens == 3)
    assert single.generation_duration == 0.0  # its one token came out of the prefill
    # Measured per request: under a burst the requests did not all wait or start alike.
    assert len({m.server_ttft for m in metrics}) > 1
    assert len({m.prefill_queue_duration for m in metrics}) > 1
