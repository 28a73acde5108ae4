"""The Tinker wire's protobuf: the service's own schema against the 0.38 client's, what the
client encodes decoded exactly (plain and zstd), what the service encodes read back by the
client's decoders; and every malformed request refused with a 4xx that names what is wrong."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zstandard
from tinker import types
from tinker.proto import tinker_public_pb2 as client_pb
from tinker.proto.request_conv import forward_backward_request_to_proto
from tinker.proto.response_conv import deserialize_forward_backward_output, deserialize_sample_response

from runner.local import tinker_proto
from runner.local.catalogue import EOS_TOKEN_IDS
from tests.tinker.conftest import TINY


def test_declared_fields_match_the_client_schema():
    """Every field the service declares has the 0.38 client's number, type and cardinality."""
    ours = tinker_proto.messages
    for name, cls in ours.items():
        theirs = client_pb.DESCRIPTOR.message_types_by_name[name]
        for f in cls.DESCRIPTOR.fields:
            other = theirs.fields_by_name[f.name]
            assert (f.number, f.type, f.is_repeated) == (other.number, other.type, other.is_repeated), f"{name}.{f.name}"
            if f.message_type is not None and not f.message_type.GetOptions().map_entry:
                assert f.message_type.name == other.message_type.name
    for name in ("DType", "StopReason"):
        assert ({v.name: v.number for v in client_pb.DESCRIPTOR.enum_types_by_name[name].values}
                == {v.name: v.number for v in ours["Tensor" if name == "DType" else "SampledSequence"]
                    .DESCRIPTOR.file.enum_types_by_name[name].values})


def client_request(forward_only: bool = False) -> bytes:
    data = [types.Datum(model_input=types.ModelInput.from_ints([5, 6, 7]),
                        loss_fn_inputs={"target_tokens": [6, 7, 8], "weights": torch.tensor([0.0, 0.5, 1.0]),
                                        "advantages": np.array([1.0, -1.0, 2.0], dtype=np.float32)}),
            types.Datum(model_input=types.ModelInput(chunks=[types.EncodedTextChunk(tokens=[1]),
                                                             types.EncodedTextChunk(tokens=[2, 3])]),
                        loss_fn_inputs={"target_tokens": [2, 3, 4], "weights": [1.0, 1.0, 1.0],
                                        "advantages": [0.0, 0.0, 0.0]})]
    request = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=data, loss_fn="ppo",
                                                          loss_fn_config={"clip_low_threshold": 0.8, "mode": "x"}),
        model_id="s000000000000:train:0", seq_id=7)
    message = forward_backward_request_to_proto(request)
    message.forward_only = forward_only
    return message.SerializeToString()


@pytest.mark.parametrize("compressed", [False, True])
def test_the_clients_forward_backward_decodes_exactly(compressed):
    body = client_request(forward_only=True)
    sent = zstandard.ZstdCompressor().compress(body) if compressed else body
    decoded = tinker_proto.decode_forward_backward(tinker_proto.decompress(sent, "zstd" if compressed else None))
    assert (decoded.model_id, decoded.seq_id, decoded.loss_fn, decoded.forward_only) == (
        "s000000000000:train:0", 7, "ppo", True)
    assert decoded.loss_fn_config == {"clip_low_threshold": pytest.approx(0.8), "mode": "x"}
    assert [d.tokens for d in decoded.data] == [[5, 6, 7], [1, 2, 3]]
    first = decoded.data[0].inputs
    assert first["target_tokens"].tolist() == [6, 7, 8] and first["target_tokens"].dtype == np.int64
    assert first["weights"].tolist() == [0.0, 0.5, 1.0] and first["advantages"].tolist() == [1.0, -1.0, 2.0]


def test_sparse_tensors_densify_as_the_client_encodes_them():
    dense = torch.tensor([[0, 3, 0, 0], [0, 0, 0, 0], [7, 0, 0, 9]], dtype=torch.int64)
    message = client_pb.Tensor()
    message.CopyFrom(_client_tensor(types.TensorData.from_torch_sparse(dense)))
    assert message.WhichOneof("encoding") == "sparse_csr"
    ours = tinker_proto.messages["Tensor"].FromString(message.SerializeToString())
    assert tinker_proto._tensor(ours, "t").tolist() == dense.tolist()


def _client_tensor(td):
    from tinker.proto.request_conv import _tensor_data_to_proto
    return _tensor_data_to_proto(td)


def test_results_read_back_through_the_clients_decoders():
    output = deserialize_forward_backward_output(tinker_proto.encode_forward_backward_output(
        [np.array([-1.0, -2.5], dtype=np.float32), np.array([], dtype=np.float32), np.array([-0.5])],
        {"loss:sum": 4.0}))
    assert [o["logprobs"].data for o in output.loss_fn_outputs] == [[-1.0, -2.5], [], [-0.5]]
    assert output.metrics == {"loss:sum": 4.0}
    sample = deserialize_sample_response(tinker_proto.encode_sample_response(
        [tinker_proto.EncodedSequence([4, 9], [-0.25, -1.5], stop=True, topk=[[(4, -0.25)], [(9, -1.5), (3, -2.0)]])],
        prompt_logprobs=[float("nan"), -3.0], prompt_topk=[[], [(2, -0.5)]], prompt_k=2, sample_k=2))
    (seq,) = sample.sequences
    assert (seq.tokens, seq.logprobs, seq.stop_reason) == ([4, 9], [-0.25, -1.5], "stop")
    assert seq.topk_logprobs[1] == [(9, -1.5), (3, -2.0)]
    assert sample.prompt_logprobs == [None, -3.0]


@pytest.mark.parametrize("body, message", [
    (b"\xff\xff\xff", "not a tinker_public.ForwardBackwardRequest"),
    (None, "1025 datums"),
    ("tokens", "not a whole number of int32"),
    ("shape", "do not fill shape"),
    ("image", "only encoded_text chunks"),
])
def test_malformed_protobuf_is_a_wire_error_naming_the_problem(body, message):
    msg = client_pb.ForwardBackwardRequest(model_id="m", seq_id=1, loss_fn="cross_entropy")
    if body is None:
        for _ in range(1025):
            msg.data.add().model_input.add().encoded_text.tokens = np.array([1], dtype=np.int32).tobytes()
        body = msg.SerializeToString()
    elif body == "tokens":
        msg.data.add().model_input.add().encoded_text.tokens = b"\x01\x02\x03"
        body = msg.SerializeToString()
    elif body == "shape":
        d = msg.data.add()
        d.model_input.add().encoded_text.tokens = np.array([1, 2], dtype=np.int32).tobytes()
        t = d.loss_fn_inputs["target_tokens"]
        t.dtype, t.dense = client_pb.DTYPE_INT64, np.array([1, 2, 3], dtype=np.int64).tobytes()
        t.shape.append(2)
        body = msg.SerializeToString()
    elif body == "image":
        msg.data.add().model_input.add().image.data = b"png"
        body = msg.SerializeToString()
    with pytest.raises(tinker_proto.WireError, match=message):
        tinker_proto.decode_forward_backward(body)


def test_a_zstd_body_cannot_expand_past_the_limit():
    bomb = zstandard.ZstdCompressor().compress(b"\0" * (tinker_proto.MAX_BODY_BYTES + 10))
    with pytest.raises(tinker_proto.WireError, match="exceeds"):
        tinker_proto.decompress(bomb, "zstd")
    with pytest.raises(tinker_proto.WireError, match="not valid zstd"):
        tinker_proto.decompress(b"not zstd", "zstd")
    with pytest.raises(tinker_proto.WireError, match="gzip"):
        tinker_proto.decompress(b"x", "gzip")


# -- bad requests over HTTP ----------------------------------------------------------------

def _session(http) -> str:
    return http.post("/api/v1/create_session", json={"tags": [], "user_metadata": {}, "sdk_version": "0"}).json()[
        "session_id"]


def _model(http) -> str:
    session = _session(http)
    created = http.post("/api/v1/create_model", json={"session_id": session, "model_seq_id": 0, "base_model": TINY,
                                                       "lora_config": {"rank": 2}})
    assert created.status_code == 200, created.text
    return created.json()["model_id"]


def _proto(http, model_id: str, seq_id: int, datums: int = 1, loss_fn: str = "cross_entropy", token: int = 5):
    msg = client_pb.ForwardBackwardRequest(model_id=model_id, seq_id=seq_id, loss_fn=loss_fn)
    for _ in range(datums):
        d = msg.data.add()
        d.model_input.add().encoded_text.tokens = np.array([1, token], dtype=np.int32).tobytes()
        t = d.loss_fn_inputs["target_tokens"]
        t.dtype, t.dense = client_pb.DTYPE_INT64, np.array([2, 3], dtype=np.int64).tobytes()
    return http.post("/api/v1/forward_backward", content=msg.SerializeToString(),
                     headers={"Content-Type": "application/x-protobuf"})


@pytest.mark.parametrize("case, status, message", [
    ("unknown model", 400, "base model 'Qwen/Nope' is not served here"),
    ("rank", 400, "lora_config.rank must be an integer"),
    ("optimizer", 400, "only|not available locally"),
    ("session", 404, "unknown session"),
    ("metadata", 400, "user_metadata\\['k'\\] must be a string or a number"),
])
def test_create_model_refuses_bad_requests(http, case, status, message):
    body = {"session_id": _session(http), "model_seq_id": 0, "base_model": TINY, "lora_config": {"rank": 2}}
    if case == "unknown model":
        body["base_model"] = "Qwen/Nope"
    elif case == "rank":
        body["lora_config"] = {"rank": "8"}
    elif case == "optimizer":
        body["optimizer_config"] = {"type": "dimuon", "version": 1}
    elif case == "session":
        body["session_id"] = "s" + "0" * 12
    elif case == "metadata":
        body["user_metadata"] = {"k": {"nested": 1}}
    response = http.post("/api/v1/create_model", json=body)
    assert response.status_code == status
    assert __import__("re").search(message, response.json()["error"]["message"])


def test_forward_backward_refuses_bad_requests_and_keeps_the_sequence(http):
    model_id = _model(http)
    checks = [
        (_proto(http, model_id, 1, loss_fn="stable_reinforce"), 400, "unknown loss function 'stable_reinforce'"),
        (_proto(http, model_id, 2, token=10**6), 400, "outside the vocabulary"),
        (_proto(http, "s000000000000:train:9", 1), 404, "unknown model_id"),
        (http.post("/api/v1/forward_backward", content=b"{}", headers={"Content-Type": "application/json"}), 415,
         "application/x-protobuf"),
        (http.post("/api/v1/forward_backward", content=b"\x0a", headers={"Content-Type": "application/x-protobuf"}),
         400, "not a tinker_public.ForwardBackwardRequest"),
        # 25 MiB, streamed without a Content-Length: refused as it arrives
        (http.post("/api/v1/forward_backward", content=(b"x" * 2**20 for _ in range(25)),
                   headers={"Content-Type": "application/x-protobuf"}), 413, "limit"),
    ]
    for response, status, message in checks:
        assert response.status_code == status, response.text
        assert message in response.json()["error"]["message"]
    # The refused requests used up seq_ids 1 and 2: seq_id 3 runs (it would wait forever otherwise).
    ok = _proto(http, model_id, 3)
    assert ok.status_code == 200
    result = http.post("/api/v1/retrieve_future", json={"request_id": ok.json()["request_id"]},
                       headers={"Accept": "application/x-protobuf"})
    assert result.headers["content-type"] == "application/x-protobuf"
    assert len(deserialize_forward_backward_output(result.content).loss_fn_outputs) == 1


@pytest.mark.parametrize("patch, message", [
    ({"num_samples": 0}, "num_samples"),
    ({"sampling_params": {"max_tokens": -1}}, "max_tokens"),
    ({"sampling_params": {"max_tokens": 2, "top_p": 0}}, "top_p"),
    ({"sampling_params": {"max_tokens": 2, "stop": []}}, "stop=[]"),
    ({"sampling_params": {"max_tokens": 2, "frequency_penalty": 1}}, "unknown sampling_params"),
    ({"prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, -4]}]}}, "token ids"),
    ({"prompt_alt_tokens_k": 2}, "not supported"),
    ({"topk_sample_logprobs": 999}, "topk_sample_logprobs"),
])
def test_asample_refuses_bad_requests(http, patch, message):
    session = _session(http)
    sampler = http.post("/api/v1/create_sampling_session", json={
        "session_id": session, "sampling_session_seq_id": 0, "base_model": TINY}).json()["sampling_session_id"]
    body = {"sampling_session_id": sampler, "seq_id": 0, "num_samples": 1,
            "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2]}]},
            "sampling_params": {"max_tokens": 2}, **patch}
    response = http.post("/api/v1/asample", json=body)
    assert response.status_code == 400 and message in response.json()["error"]["message"]


def test_paths_and_ids_from_a_request_are_checked(http):
    for path in ("tinker://../../etc/weights/x", "tinker://run/weights/../x", "file:///etc/passwd", 7):
        response = http.post("/api/v1/weights_info", json={"tinker_path": path})
        assert response.status_code in (400, 404), path
        assert "error" in response.json()
    assert http.get("/api/v1/training_runs/nope").status_code == 404
    assert http.get("/api/v1/training_runs?limit=-1").status_code == 400
    assert http.post("/api/v1/retrieve_future", json={"request_id": "nope"}).status_code == 404
    assert http.post("/api/v1/save_weights", json={"model_id": _model(http), "seq_id": 1, "path": "../escape"}
                     ).status_code == 400


def test_retrieve_futures_reports_each_sampling_completion_once_per_cursor(http):
    """The long-poll a sampling client runs for its session: nothing yet is an immediate empty
    answer (timeout 0), a finished sample appears after the cursor, an acknowledged cursor
    trims it, and a retrieved id's payload is let go."""
    session = _session(http)
    sampler = http.post("/api/v1/create_sampling_session", json={
        "session_id": session, "sampling_session_seq_id": 0, "base_model": TINY}).json()["sampling_session_id"]
    target = {"type": "sampling_session", "sampling_session_id": sampler, "cloned_sampler_id": 0}
    empty = http.post("/api/v1/retrieve_futures", json={"target": target, "prev_cursor": 0, "timeout": 0}).json()
    assert empty == {"completions": [], "cursor": 0}
    request_id = http.post("/api/v1/asample", json={
        "sampling_session_id": sampler, "seq_id": 0, "num_samples": 1,
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2]}]},
        "sampling_params": {"max_tokens": 2}}).json()["request_id"]
    done = http.post("/api/v1/retrieve_futures", json={"target": target, "prev_cursor": 0}).json()
    assert done["completions"] == [{"state": "finished", "request_id": request_id}] and done["cursor"] == 1
    result = http.post("/api/v1/retrieve_future", json={"request_id": request_id}).json()
    # JSON for a client that does not accept protobuf: the sample, two tokens or fewer when the
    # (randomly initialised) model samples its end token first, as its stop reason says
    sample = result["sequences"][0]
    assert (len(sample["tokens"]), sample["stop_reason"]) == (2, "length") or \
        (sample["stop_reason"] == "stop" and sample["tokens"][-1] in EOS_TOKEN_IDS), sample
    after = http.post("/api/v1/retrieve_futures", json={"target": target, "prev_cursor": 1, "timeout": 0,
                                                        "retrieved_request_ids": [request_id]}).json()
    assert after == {"completions": [], "cursor": 1}
    assert http.post("/api/v1/retrieve_future", json={"request_id": request_id}).status_code == 404
    bad = http.post("/api/v1/retrieve_futures", json={"target": target, "prev_cursor": -1})
    assert bad.status_code == 400 and "prev_cursor" in bad.json()["error"]["message"]


def test_retrieve_future_answers_try_again_until_the_result_is_ready(http):
    """A request held back for an earlier seq_id is not ready within one long-poll: the
    answer is try_again (the client polls again); once the gap is filled it is the result."""
    model_id = _model(http)
    later = _proto(http, model_id, 2)
    assert later.status_code == 200
    pending = http.post("/api/v1/retrieve_future", json={"request_id": later.json()["request_id"]}, timeout=60)
    assert pending.json() == {"type": "try_again", "request_id": later.json()["request_id"], "queue_state": "active"}
    assert _proto(http, model_id, 1).status_code == 200
    done = http.post("/api/v1/retrieve_future", json={"request_id": later.json()["request_id"]},
                     headers={"Accept": "application/x-protobuf"}, timeout=60)
    assert deserialize_forward_backward_output(done.content).metrics["num_sequences:sum"] == 1
