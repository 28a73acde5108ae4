"""Benchmark of the Tinker wire against the FireTitan one, on one local service.

Prints one JSON object:

- ``tinker_step_ratio_vs_fireworks_sdk``: a LoRA train step (``forward_backward`` with
  cross_entropy + ``optim_step``) through the unmodified ``tinker`` client (protobuf
  forward_backward, as 0.38 sends it), divided by the same step through the FireTitan
  SDK (JSON), on one engine in one run: the same model, rank, alpha and 32 x 64-token
  batch; the two alternate step by step. Target: <= 1.1.
- ``proto_decode_ms_per_mb``: the service's decoding of a forward_backward body the
  tinker client encoded (``tinker_proto.decode_forward_backward``), in ms per MB of body
  (median of repeats), for a batch of datums with weights; ``zstd_decode_ms_per_mb`` the
  same body zstd-compressed, per MB of the uncompressed body (decompression included).

Usage: ``python benchmarks/tinker_protocol.py [--rounds N] [--steps-per-round N]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.local_service import (BATCH, LEARNING_RATE, LORA_MODEL, LORA_RANK, LORA_SHAPE,  # noqa: E402
                                      SEQ_LEN, make_batch, make_service, sdk_datums, sdk_train_step, time_interleaved)


def tinker_train_step(info, sequences):
    import tinker
    from tinker import types

    client = tinker.ServiceClient(base_url=info.base_url, api_key="tml-local")
    training = client.create_lora_training_client(base_model=LORA_MODEL, rank=LORA_RANK).result()
    datums = [types.Datum(model_input=types.ModelInput.from_ints(seq[:-1]), loss_fn_inputs={"target_tokens": seq[1:]})
              for seq in sequences]
    adam = types.AdamParams(learning_rate=LEARNING_RATE, beta1=0.9, beta2=0.95, eps=1e-12)

    def step() -> None:  # as the FireTitan step is taken: each call waited for before the next
        training.forward_backward(datums, "cross_entropy").result()
        training.optim_step(adam).result()
    return client, step


def bench_step(info, rounds: int, steps_per_round: int) -> dict:
    sequences = make_batch(259)
    # Tinker's LoraConfig has no alpha (the local trainer's default is 2 x rank): the FireTitan
    # trainer is given the same.
    service = make_service(info, deployment_id="bench-tinker", base_model=LORA_MODEL, lora_rank=LORA_RANK,
                           lora_alpha=2 * LORA_RANK, training_shape_id=LORA_SHAPE)
    client = None
    try:
        firetitan_step = sdk_train_step(service, sdk_datums(sequences))
        client, tinker_step = tinker_train_step(info, sequences)
        tinker_ms, firetitan_ms, steps = time_interleaved(tinker_step, firetitan_step, rounds, steps_per_round)
        return {"tinker_step_ratio_vs_fireworks_sdk": round(tinker_ms / firetitan_ms, 3),
                "tinker_step_ms": round(tinker_ms, 2), "fireworks_sdk_step_ms": round(firetitan_ms, 2),
                "steps_measured": steps, "lora": {"base_model": LORA_MODEL, "rank": LORA_RANK, "alpha": 2 * LORA_RANK}}
    finally:
        service.close()
        if client is not None:
            client.close("success").result()


def bench_decode(repeats: int = 15) -> dict:
    import numpy as np
    import zstandard
    from tinker import types
    from tinker.proto.request_conv import forward_backward_request_to_proto

    from runner.local.tinker_proto import decode_forward_backward, decompress

    rng = np.random.default_rng(0)
    datums = [types.Datum(model_input=types.ModelInput.from_ints(rng.integers(0, 256, 1024).tolist()),
                          loss_fn_inputs={"target_tokens": rng.integers(0, 256, 1024),
                                          "weights": rng.random(1024, dtype=np.float32)}) for _ in range(256)]
    request = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=datums, loss_fn="cross_entropy"),
        model_id="s000000000000:train:0", seq_id=1)
    body = forward_backward_request_to_proto(request).SerializeToString()
    compressed = zstandard.ZstdCompressor().compress(body)
    mb = len(body) / 1e6

    def median_ms(fn) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return 1e3 * statistics.median(times)
    plain = median_ms(lambda: decode_forward_backward(body))
    zstd = median_ms(lambda: decode_forward_backward(decompress(compressed, "zstd")))
    return {"proto_decode_ms_per_mb": round(plain / mb, 3), "zstd_decode_ms_per_mb": round(zstd / mb, 3),
            "decode_body_mb": round(mb, 3), "decode_body_zstd_mb": round(len(compressed) / 1e6, 3),
            "decode_datums": len(datums), "decode_tokens_per_datum": 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps-per-round", type=int, default=8)
    args = parser.parse_args()
    logging.getLogger("fireworks").setLevel(logging.ERROR)
    logging.getLogger("tinker").setLevel(logging.ERROR)

    from runner.local.supervisor import local_service

    with local_service() as info:
        result = {"device": "cpu", "batch": [BATCH, SEQ_LEN], "load_average": os.getloadavg()}
        result.update(bench_step(info, args.rounds, args.steps_per_round))
    result.update(bench_decode())
    result["targets"] = {"tinker_step_ratio_vs_fireworks_sdk": "<= 1.1"}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
