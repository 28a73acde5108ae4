"""The local engine on its own (no HTTP): tokenizer, catalogue, training semantics,
snapshots, state and generation. Everything runs on CPU with the tiny model."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from runner.local import catalogue
from runner.local import model as model_io
from runner.local import wire
from runner.local.engine import Datum, EngineError, GenRequest, Sampler, Trainer, prepare_batch, prepare_dense_batch

TINY = "local/tiny-qwen3"
ADAM = {"learning_rate": 3e-3, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.0,
        "grad_clip_norm": 1.0}


# --- helpers ---------------------------------------------------------------------------

def chat_prompt(text: str) -> list[int]:
    """The chat template's token ids for one user turn, built by hand (byte ids)."""
    return ([catalogue.IM_START_ID] + list(b"user\n" + text.encode()) + [catalogue.IM_END_ID, 10,
            catalogue.IM_START_ID] + list(b"assistant\n"))


def reverse_pair(rng: random.Random, digits: int = 4) -> tuple[list[int], list[int]]:
    s = "".join(rng.choice("0123456789") for _ in range(digits))
    return chat_prompt(f"reverse {s}"), list(s[::-1].encode()) + [catalogue.IM_END_ID]


def sft_example(prompt: list[int], completion: list[int]) -> Datum:
    """Next-token datum with the loss on the completion only (Tinker's layout)."""
    full = prompt + completion
    weights = [0.0] * (len(prompt) - 1) + [1.0] * len(completion)
    return Datum(full[:-1], {"target_tokens": torch.tensor(full[1:]), "weights": torch.tensor(weights)})


def random_examples(n: int, length: int, seed: int = 0) -> list[Datum]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        toks = torch.randint(0, 256, (length + 1 - i % 3,), generator=g)  # ragged lengths
        out.append(Datum(toks[:-1].tolist(), {"target_tokens": toks[1:].clone(),
                                                "weights": torch.rand(len(toks) - 1, generator=g)}))
    return out


def policy_examples(trainer: Trainer, n: int = 4, length: int = 12, seed: int = 0) -> list[Datum]:
    """Examples whose sampling logprobs equal the trainer's current ones (ratio 1)."""
    g = torch.Generator().manual_seed(seed)
    base = random_examples(n, length, seed)
    current = trainer.forward(base).logprobs
    return [Datum(ex.tokens, {"target_tokens": ex.inputs["target_tokens"], "logprobs": lp.clone(),
                                "advantages": torch.randn(len(ex.tokens), generator=g)})
            for ex, lp in zip(base, current)]


def weights_of(module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model_io.weight_dict(module).items()}


def grads_of(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in trainer.model.named_parameters()}


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    unequal = [k for k in a if not torch.equal(a[k], b[k])]
    assert not unequal, f"tensors differ: {unequal[:5]}"


@pytest.fixture
def trainer(tmp_path) -> Trainer:
    return Trainer(TINY, state_dir=tmp_path, seed=0)


@pytest.fixture(scope="module")
def reversal_run(tmp_path_factory):
    """Train the tiny model from scratch on 4-digit reversal; shared by the generation tests."""
    torch.manual_seed(0)
    trainer = Trainer(TINY, state_dir=tmp_path_factory.mktemp("rev"), seed=0)
    rng = random.Random(0)
    held_out = [reverse_pair(random.Random(10_000 + i)) for i in range(48)]
    losses = []
    for _ in range(200):  # ~0.9 greedy accuracy by step ~125 at this batch size and lr
        batch = [sft_example(*reverse_pair(rng)) for _ in range(32)]
        result = trainer.forward_backward(batch, "cross_entropy")
        losses.append(result.metrics["loss:sum"] / sum(float(ex.inputs["weights"].sum()) for ex in batch))
        trainer.optim_step(ADAM)
    sampler = Sampler(TINY, seed=0)
    sampler.hot_load(trainer.save_sampler_snapshot("reversal", "base")["path"])
    return trainer, sampler, losses, held_out


# --- tokenizer and catalogue ------------------------------------------------------------------

def test_tokenizer_loads_offline_with_byte_tokens_and_chat_template():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(catalogue.tokenizer_path())
    assert len(tok) == catalogue.VOCAB_SIZE
    assert tok.encode("98765", add_special_tokens=False) == [ord(c) for c in "98765"]
    assert tok.eos_token_id == catalogue.IM_END_ID and tok.pad_token_id == catalogue.ENDOFTEXT_ID
    ids = tok.apply_chat_template([{"role": "user", "content": "reverse 12"}], add_generation_prompt=True,
                                  tokenize=False)
    assert tok.encode(ids, add_special_tokens=False) == chat_prompt("reverse 12")
    assert tok.decode([ord("4"), ord("2"), catalogue.IM_END_ID], skip_special_tokens=True) == "42"


def test_catalogue_resolves_names_and_reports_unknown_ones():
    for name in ("accounts/fireworks/models/qwen3-8b", "accounts/fireworks/models/qwen3-0p6b",
                 "accounts/fireworks/models/qwen3-4b", TINY):
        card = catalogue.resolve(name)
        assert card.config["vocab_size"] == catalogue.VOCAB_SIZE
    with pytest.raises(catalogue.UnknownModel, match="qwen3-8b") as info:
        catalogue.resolve("accounts/fireworks/models/nope")
    assert isinstance(info.value, KeyError) and isinstance(info.value, EngineError)
    assert "nope" in str(info.value)
    for shape in catalogue.TRAINING_SHAPES.values():
        assert shape.base_model in catalogue.BASE_MODELS
    with pytest.raises(EngineError, match="unknown base model"):
        Trainer("nope", state_dir=".")


def test_managed_shape_names_parse_by_their_pattern():
    parse = catalogue.parse_managed_shape
    assert parse("qwen3-8b-128k-h200") == catalogue.ManagedShapeName("qwen3-8b", 128, "h200", False)
    assert parse("qwen3p6-35b-a3b-256k-lora") == catalogue.ManagedShapeName("qwen3p6-35b-a3b", 256, None, True)
    assert parse("qwen3-8b-128k-h200-lora") == catalogue.ManagedShapeName("qwen3-8b", 128, "h200", True)
    assert parse("qwen3p5-9b-65k").context_k == 65
    for bad in ("qwen3-8b", "128k", "-128k", "qwen3-8b-0k", "qwen3-8b-128k-h200-extra", "Qwen3-8B-128k",
                "qwen3-8b-128k-200", "qwen3--8b-128k", "lora"):
        assert parse(bad) is None, bad
    shape = catalogue.training_shape("qwen3p5-9b-256k-lora")
    assert (shape.base_model, shape.trainer_mode, shape.supports_lora) == (
        "accounts/fireworks/models/qwen3p5-9b", "lora", True)
    assert shape.max_context_length == catalogue.resolve(shape.base_model).max_context_length
    with pytest.raises(catalogue.UnknownShape, match="local up --model-dir accounts/fireworks/models/glm-5=DIR"):
        catalogue.training_shape("glm-5-128k")


def test_build_model_is_determined_by_seed():
    card = catalogue.resolve(TINY)
    a, b, c = (weights_of(model_io.build_model(card, seed)) for seed in (0, 0, 1))
    assert_bitwise_equal(a, b)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])
    assert a["model.embed_tokens.weight"].std() > 0.01  # a real random init, not zeros


# --- forward and losses -------------------------------------------------------------------------

def test_forward_returns_target_logprobs_without_touching_grads(trainer):
    examples = random_examples(3, 10)
    result = trainer.forward(examples)
    assert [len(lp) for lp in result.logprobs] == [len(ex.tokens) for ex in examples]
    for ex, lp in zip(examples, result.logprobs):
        logits = trainer.model(input_ids=torch.tensor([ex.tokens])).logits[0]
        expected = torch.log_softmax(logits, -1).gather(-1, ex.inputs["target_tokens"][:, None])[:, 0]
        torch.testing.assert_close(lp, expected.detach(), rtol=0, atol=1e-5)
    expected_loss = -sum(float((ex.inputs["weights"] * lp).sum()) for ex, lp in zip(examples, result.logprobs))
    assert result.metrics["loss:sum"] == pytest.approx(expected_loss, rel=1e-5)
    assert all(p.grad is None for p in trainer.model.parameters())
    assert all(":" in key for key in result.metrics)  # the SDK's chunk merger splits on ':'


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    examples = random_examples(8, 16)
    split, whole = (Trainer(TINY, state_dir=tmp_path / name) for name in ("split", "whole"))
    split.forward_backward(examples[:3])
    split.forward_backward(examples[3:])
    whole.forward_backward(examples)
    for name, grad in grads_of(whole).items():
        torch.testing.assert_close(grads_of(split)[name], grad, rtol=1e-4, atol=1e-6)
    m_split, m_whole = split.optim_step(ADAM), whole.optim_step(ADAM)
    assert m_split["grad_norm"] == pytest.approx(m_whole["grad_norm"], rel=1e-4)
    assert m_split["step"] == 1.0 and m_split["num_loss_sequences"] == 8
    # Adam's first step is ~lr * sign(grad), which amplifies float noise on near-zero
    # gradients, so the weights get a looser bound than the gradients above.
    for name, w in weights_of(whole.model).items():
        torch.testing.assert_close(weights_of(split.model)[name], w, rtol=0, atol=1e-4)
    assert all(p.grad is None for p in split.model.parameters())  # optim_step zeroed them


def test_policy_losses_at_ratio_one(trainer):
    examples = policy_examples(trainer)
    advantage_sum = sum(float(ex.inputs["advantages"].sum()) for ex in examples)
    for loss_fn in ("importance_sampling", "ppo", "cispo", "dro"):
        result = trainer.forward(examples, loss_fn)
        if loss_fn in ("importance_sampling", "ppo"):
            expected = -advantage_sum   # ratio == 1 everywhere
        else:                           # -(ratio * logp * A), -(logp * A): same at ratio 1
            expected = -sum(float((ex.inputs["advantages"] * lp).sum())
                            for ex, lp in zip(examples, result.logprobs))
        assert result.metrics["loss:sum"] == pytest.approx(expected, rel=1e-4, abs=1e-4), loss_fn
    assert trainer.forward(examples, "ppo").metrics["clip_fraction:mean"] == 0.0


def test_ppo_clipping_stops_the_gradient(trainer):
    examples = policy_examples(trainer, n=2)
    for ex in examples:  # sampler far less likely than the policy: ratio >> 1.2, positive advantage
        ex.inputs["logprobs"] = ex.inputs["logprobs"] - 5.0
        ex.inputs["advantages"] = torch.ones(len(ex.tokens))
    result = trainer.forward_backward(examples, "ppo")
    assert result.metrics["clip_fraction:mean"] == 1.0
    assert all(float(p.grad.abs().max()) == 0.0 for p in trainer.model.parameters() if p.grad is not None)
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.forward_backward(examples, "ppo", {"clip_low_threshold": 0.0, "clip_high_threshold": 1e9})
    assert any(float(p.grad.abs().max()) > 0 for p in trainer.model.parameters())


def test_custom_loss_via_linearised_cross_entropy_matches_autograd(tmp_path):
    """The SDK's forward_backward_custom sends forward(cross_entropy), then
    forward_backward(cross_entropy, weights = -dLoss/dlogprob). That must give the
    custom loss's own gradient."""
    examples = random_examples(3, 9)

    def custom_loss(logprobs):
        return sum((lp ** 2).sum() * (i + 1) for i, lp in enumerate(logprobs))

    direct = Trainer(TINY, state_dir=tmp_path / "a")
    logps = []
    for ex in examples:
        logits = direct.model(input_ids=torch.tensor([ex.tokens])).logits[0]
        logps.append(torch.log_softmax(logits, -1).gather(-1, ex.inputs["target_tokens"][:, None])[:, 0])
    custom_loss(logps).backward()

    via_wire = Trainer(TINY, state_dir=tmp_path / "b")
    zero_weighted = [Datum(ex.tokens, {"target_tokens": ex.inputs["target_tokens"],
                                         "weights": torch.zeros(len(ex.tokens))}) for ex in examples]
    forward = via_wire.forward(zero_weighted, "cross_entropy")
    leaves = [lp.clone().requires_grad_(True) for lp in forward.logprobs]
    custom_loss(leaves).backward()
    linear = [Datum(ex.tokens, {"target_tokens": ex.inputs["target_tokens"], "weights": -leaf.grad})
              for ex, leaf in zip(examples, leaves)]
    via_wire.forward_backward(linear, "cross_entropy")
    for name, grad in grads_of(direct).items():  # padded batch vs one-by-one: float noise only
        torch.testing.assert_close(grads_of(via_wire)[name], grad, rtol=1e-3, atol=1e-5)


# --- optimizer -------------------------------------------------------------------------------------

def test_optim_step_reports_preclip_norm_and_clips(tmp_path):
    examples = random_examples(4, 12)
    clipped, free = (Trainer(TINY, state_dir=tmp_path / n) for n in ("c", "f"))
    for t in (clipped, free):
        t.forward_backward(examples)
    norm = float(torch.nn.utils.get_total_norm([p.grad for p in free.model.parameters()]))
    m = clipped.optim_step({**ADAM, "grad_clip_norm": 0.5, "learning_rate": 0.0})
    assert m["grad_norm"] == pytest.approx(norm, rel=1e-5) and norm > 0.5
    assert m["learning_rate"] == 0.0 and clipped.step == 1
    # lr 0 and no weight decay: AdamW leaves the weights exactly as they were
    assert_bitwise_equal(weights_of(clipped.model), weights_of(free.model))


def test_forward_only_trainer_refuses_updates(tmp_path):
    ref = Trainer(TINY, state_dir=tmp_path, forward_only=True)
    assert len(ref.forward(random_examples(2, 5)).logprobs) == 2
    with pytest.raises(EngineError, match="forward-only"):
        ref.forward_backward(random_examples(2, 5))
    with pytest.raises(EngineError, match="forward-only"):
        ref.optim_step(ADAM)


# --- snapshots and state -----------------------------------------------------------------------

def test_base_and_delta_snapshots_reproduce_trainer_weights_bitwise(trainer, tmp_path):
    sampler = Sampler(TINY, seed=123)  # a different init, so a load must really happen
    with pytest.raises(EngineError, match="base snapshot first"):
        trainer.save_sampler_snapshot("too-early", "delta")
    examples = random_examples(4, 12)
    trainer.forward_backward(examples)
    trainer.optim_step(ADAM)
    base = trainer.save_sampler_snapshot("s1-base", "base")
    assert base["kind"] == "base" and base["base_path"] is None
    sampler.hot_load(base["path"])
    assert sampler.identity == base["path"]
    assert_bitwise_equal(weights_of(sampler.model), weights_of(trainer.model))
    for step in (2, 3):
        trainer.forward_backward(examples)
        trainer.optim_step(ADAM)
        delta = trainer.save_sampler_snapshot(f"s{step}-delta", "delta")
        assert delta["base_path"] == base["path"]
        sampler.hot_load(delta["path"])
        assert_bitwise_equal(weights_of(sampler.model), weights_of(trainer.model))
    fresh = Sampler(TINY)  # a deployment that never saw the base loads it through the delta
    fresh.hot_load(delta["path"])
    assert_bitwise_equal(weights_of(fresh.model), weights_of(trainer.model))
    with pytest.raises(EngineError, match="already exists"):
        trainer.save_sampler_snapshot("s1-base", "base")
    with pytest.raises(EngineError, match="no sampler snapshot"):
        sampler.hot_load(str(tmp_path / "missing"))


def test_state_round_trip_is_exact(tmp_path):
    batches = [random_examples(4, 12, seed=s) for s in range(4)]

    def train(t, which):
        for b in which:
            t.forward_backward(batches[b])
            t.optim_step(ADAM)

    straight = Trainer(TINY, state_dir=tmp_path / "a")
    train(straight, [0, 1, 2, 3])

    first = Trainer(TINY, state_dir=tmp_path / "b")
    train(first, [0, 1])
    path = first.save_state("step-2")
    resumed = Trainer(TINY, state_dir=tmp_path / "b", seed=7)  # other init: everything must come from disk
    resumed.load_state(path)
    assert resumed.step == 2
    train(resumed, [2, 3])
    assert resumed.step == straight.step == 4
    assert_bitwise_equal(weights_of(resumed.model), weights_of(straight.model))

    weights_only = Trainer(TINY, state_dir=tmp_path / "b")
    weights_only.load_state(path, with_optimizer=False)
    assert_bitwise_equal(weights_of(weights_only.model), weights_of(first.model))
    assert not weights_only.optimizer.state  # fresh moments
    with pytest.raises(EngineError, match="no training state"):
        weights_only.load_state(str(tmp_path / "nothing"))


def test_states_are_dcp_and_pre_dcp_states_still_load(tmp_path):
    trainer = Trainer(TINY, state_dir=tmp_path / "a")
    trainer.forward_backward(random_examples(4, 12))
    trainer.optim_step(ADAM)
    path = Path(trainer.save_state("step_00001"))
    assert (path / ".metadata").is_file()  # torch.distributed.checkpoint wrote it
    assert model_io.read_meta(path)["format"] == "firetitan-local-state/2"

    # A state written before DCP (model.safetensors + optimizer.pt) loads as it did.
    legacy = tmp_path / "legacy"
    model_io.save_weights(legacy, model_io.weight_dict(trainer.model),
                          {"format": "firetitan-local-state/1", "base_model": TINY, "seed": 0, "step": 1,
                           "lora_rank": 0})
    torch.save(trainer.optimizer.state_dict(), legacy / "optimizer.pt")
    old = Trainer(TINY, state_dir=tmp_path / "b", seed=9)
    old.load_state(str(legacy))
    assert_bitwise_equal(weights_of(old.model), weights_of(trainer.model))
    new = Trainer(TINY, state_dir=tmp_path / "c", seed=9)
    new.load_state(str(path))
    for t in (old, new, trainer):
        t.forward_backward(random_examples(4, 12, seed=3))
        t.optim_step(ADAM)
    assert_bitwise_equal(weights_of(old.model), weights_of(trainer.model))
    assert_bitwise_equal(weights_of(new.model), weights_of(trainer.model))

    # Anything else is a clear error, not a torch traceback.
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "meta.json").write_text('{"format": "someone-elses/9"}')
    with pytest.raises(EngineError, match="not a training state this service reads.*someone-elses/9"):
        new.load_state(str(tmp_path / "odd"))


def test_lora_trains_adapters_only_and_snapshots_merge_exactly(tmp_path):
    from runner.local.engine import LoraSettings, weights_digest

    lora = Trainer(TINY, state_dir=tmp_path, lora=LoraSettings(rank=4, alpha=32))
    base = weights_digest(lora.effective_weights())
    assert base == weights_digest(Trainer(TINY, state_dir=tmp_path / "full").model)  # B = 0 at init
    examples = random_examples(4, 12)
    for _ in range(2):
        lora.forward_backward(examples)
        lora.optim_step(ADAM)
    trained = {name for name, p in lora.model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in name for name in trained)
    assert lora.forward(examples, base_only=True).logprobs[0].tolist() == \
        Trainer(TINY, state_dir=tmp_path / "ref").forward(examples).logprobs[0].tolist()
    snapshot = lora.save_sampler_snapshot("step_00002-x", "base")
    assert snapshot["kind"] == "adapter" and (Path(snapshot["path"]) / "adapter_config.json").is_file()
    sampler = Sampler(TINY)
    sampler.hot_load(snapshot["path"])
    assert weights_digest(sampler.model) == weights_digest(lora.effective_weights()) != base
    merged = lora.save_sampler_snapshot("merged", "merged_base")
    fresh = Sampler(TINY)
    fresh.hot_load(merged["path"])
    assert weights_digest(fresh.model) == weights_digest(sampler.model)
    with pytest.raises(EngineError, match="'delta' is for full-parameter training"):
        lora.save_sampler_snapshot("d", "delta")
    with pytest.raises(EngineError, match="base_only forwards need a LoRA trainer"):
        Trainer(TINY, state_dir=tmp_path / "full2").forward(examples, base_only=True)


# --- bad input ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("mutate, message", [
    (lambda ex: ex.tokens.__setitem__(0, 999), "outside the vocabulary"),
    (lambda ex: ex.tokens.__setitem__(1, -1), "outside the vocabulary"),
    (lambda ex: ex.inputs.__setitem__("target_tokens", torch.tensor([5] * 3 + [400] * 2)), "target token 400"),
    (lambda ex: ex.inputs.__setitem__("weights", torch.ones(2)), "expected \\(5,\\)"),
    (lambda ex: ex.inputs.pop("target_tokens"), "lacks loss_fn_inputs"),
    (lambda ex: ex.inputs.__setitem__("weights", torch.tensor([1.0, float("nan"), 1, 1, 1])), "NaN"),
    (lambda ex: ex.tokens.clear(), "no input tokens"),
])
def test_bad_datums_raise_clear_engine_errors(trainer, mutate, message):
    good, ex = (Datum([1, 2, 3, 4, 5], {"target_tokens": torch.tensor([2, 3, 4, 5, 6]), "weights": torch.ones(5)})
                for _ in range(2))
    mutate(ex)
    # The whole batch is checked at once; the one it refuses is named by its index.
    with pytest.raises(EngineError, match=message) as refused:
        trainer.forward_backward([good, ex])
    assert "datum 1" in str(refused.value)


def test_a_prepared_batch_runs_as_its_datums_and_only_under_its_loss(trainer):
    examples = random_examples(3, 6)
    batch = prepare_batch(examples, "cross_entropy", trainer.vocab_size, trainer.max_context_length)
    by_datums, by_batch = trainer.forward(examples), trainer.forward(batch)
    assert by_datums.metrics == by_batch.metrics
    assert all(torch.equal(a, b) for a, b in zip(by_datums.logprobs, by_batch.logprobs))
    with pytest.raises(EngineError, match="prepared for loss 'cross_entropy' cannot run loss 'ppo'"):
        trainer.forward(batch, "ppo")


def _wire_datum(tokens: list, **inputs: tuple[list, str]) -> dict:
    """A datum as the SDK sends it: one encoded_text chunk, dense loss inputs."""
    return {"model_input": {"chunks": [{"type": "encoded_text", "tokens": tokens}]},
            "loss_fn_inputs": {name: {"data": data, "dtype": dtype, "shape": [len(data)]}
                               for name, (data, dtype) in inputs.items()}}


def _datum_by_datum(data: list[dict], loss_fn: str):
    examples = [Datum(wire.datum_tokens(d, i), {k: wire.decode_tensor(v, k) for k, v in d["loss_fn_inputs"].items()})
                for i, d in enumerate(data)]
    return prepare_batch(examples, loss_fn, 259, 512)


def test_a_request_read_as_a_whole_batch_prepares_what_datum_by_datum_would():
    rng = random.Random(0)
    rows = [[rng.randrange(259) for _ in range(9)] for _ in range(4)]
    floats = [[rng.uniform(-2, 0) for _ in range(8)] for _ in range(4)]
    requests = {
        "cross_entropy": [_wire_datum(r[:-1], target_tokens=(r[1:], "int64")) for r in rows],
        # integer weights, an input the losses ignore: converted and dropped as datum by datum
        "importance_sampling": [_wire_datum(r[:-1], target_tokens=(r[1:], "int64"), weights=([1] * 8, "int64"),
                                            logprobs=(f, "float32"), advantages=(f[::-1], "float32"),
                                            note=([0.5] * 8, "float32")) for r, f in zip(rows, floats)],
    }
    for loss_fn, data in requests.items():
        batch = prepare_dense_batch(*wire.dense_columns(data), loss_fn, 259, 512)
        expected = _datum_by_datum(data, loss_fn)
        assert list(batch.inputs) == list(expected.inputs) and batch.lengths == expected.lengths
        for got, want in [(batch.input_ids, expected.input_ids), (batch.mask, expected.mask),
                          *((batch.inputs[k], expected.inputs[k]) for k in expected.inputs)]:
            assert got.dtype == want.dtype and torch.equal(got, want)

    # What the whole-batch reading cannot vouch for goes datum by datum (None), which names the fault.
    good = requests["cross_entropy"]
    ragged = [_wire_datum(rows[0][:5], target_tokens=(rows[0][1:6], "int64")), *good[1:]]
    sparse = [{**good[0], "loss_fn_inputs": {"target_tokens": {**good[0]["loss_fn_inputs"]["target_tokens"],
                                                               "sparse_crow_indices": [0, 8]}}}, *good[1:]]
    assert wire.dense_columns(ragged) is None and wire.dense_columns(sparse) is None
    refused = {
        "outside the vocabulary": [_wire_datum([999] * 8, target_tokens=(rows[0][1:], "int64")), *good[1:]],
        "not an integer": [_wire_datum([True] * 8, target_tokens=(rows[0][1:], "int64")), *good[1:]],
        "target token 300": [_wire_datum(rows[0][:-1], target_tokens=([300] * 8, "int64")), *good[1:]],
        "NaN": [_wire_datum(rows[0][:-1], target_tokens=(rows[0][1:], "int64"),
                            weights=([float("nan")] * 8, "float32")) for _ in range(2)],
    }
    for message, data in refused.items():
        assert prepare_dense_batch(*wire.dense_columns(data), "cross_entropy", 259, 512) is None
        with pytest.raises(EngineError, match=message):
            _datum_by_datum(data, "cross_entropy")
    assert prepare_dense_batch(*wire.dense_columns(good), "ppo", 259, 512) is None  # lacks ppo's inputs
    # integral float targets are allowed, but only the datum-by-datum rules judge them
    floats_as_targets = [_wire_datum(r[:-1], target_tokens=(r[1:], "float32")) for r in rows]
    assert prepare_dense_batch(*wire.dense_columns(floats_as_targets), "cross_entropy", 259, 512) is None
    assert torch.equal(_datum_by_datum(floats_as_targets, "cross_entropy").inputs["target_tokens"],
                       _datum_by_datum(good, "cross_entropy").inputs["target_tokens"])


def test_other_bad_requests_raise_engine_errors(trainer):
    too_long = Datum([1] * 513, {"target_tokens": torch.ones(513, dtype=torch.int64)})
    with pytest.raises(EngineError, match="513 tokens long, beyond the model's context length of 512"):
        trainer.forward([too_long])
    with pytest.raises(EngineError, match="unknown loss function 'dapo'.*cross_entropy, importance_sampling, ppo"):
        trainer.forward_backward(random_examples(1, 4), "dapo")
    with pytest.raises(EngineError, match="needed by loss 'ppo'"):
        trainer.forward_backward(random_examples(1, 4), "ppo")
    with pytest.raises(EngineError, match="zero datums"):
        trainer.forward([])
    with pytest.raises(EngineError, match="learning_rate must be a finite number"):
        trainer.optim_step({"learning_rate": -1})
    with pytest.raises(EngineError, match="unknown adam_params"):
        trainer.optim_step({"lr": 1e-3})
    with pytest.raises(EngineError, match="kind must be one of base, delta, merged_base"):
        trainer.save_sampler_snapshot("x", "full")
    with pytest.raises(EngineError, match="'merged_base' folds a LoRA adapter"):
        trainer.save_sampler_snapshot("x", "merged_base")
    assert trainer.step == 0  # nothing above changed the trainer


def test_bad_generation_requests_raise(trainer):
    sampler = Sampler(TINY)
    with pytest.raises(EngineError, match="leaving no room"):
        sampler.generate([GenRequest([1] * 512, 4)])
    with pytest.raises(EngineError, match="request 1: prompt token 300"):
        sampler.generate([GenRequest([1, 2], 4), GenRequest([300], 4)])
    with pytest.raises(EngineError, match="top_p"):
        sampler.generate([GenRequest([1], 4, temperature=1.0, top_p=0.0)])


# --- learning and generation ---------------------------------------------------------------------------

def test_reversal_loss_falls_and_greedy_becomes_right(reversal_run):
    trainer, sampler, losses, held_out = reversal_run
    assert sum(losses[-20:]) / 20 < 0.25 * sum(losses[:20]) / 20
    outs = sampler.generate([GenRequest(prompt, max_tokens=8) for prompt, _ in held_out])
    accuracy = sum(o.token_ids == answer for o, (_, answer) in zip(outs, held_out)) / len(held_out)
    assert accuracy >= 0.8, accuracy
    right = next(o for o, (_, answer) in zip(outs, held_out) if o.token_ids == answer)
    assert right.finish_reason == "stop" and right.token_ids[-1] == catalogue.IM_END_ID
    assert len(right.logprobs) == len(right.token_ids) and all(lp <= 0 for lp in right.logprobs)


def test_sampler_logprobs_match_trainer_forward(reversal_run):
    trainer, sampler, _, held_out = reversal_run
    prompt, _ = held_out[0]
    out = sampler.generate([GenRequest(prompt, max_tokens=6, temperature=1.0, seed=5)])[0]
    full = prompt + out.token_ids
    ex = Datum(full[:-1], {"target_tokens": torch.tensor(full[1:])})
    lp = trainer.forward([ex]).logprobs[0][len(prompt) - 1:]
    torch.testing.assert_close(torch.tensor(out.logprobs), lp, rtol=0, atol=1e-4)


def test_batched_greedy_equals_unbatched(reversal_run):
    _, sampler, _, held_out = reversal_run
    prompts = [held_out[0][0], held_out[1][0][:-3], chat_prompt("reverse 1"), held_out[2][0] + [49, 50]]
    requests = [GenRequest(p, max_tokens=n) for p, n in zip(prompts, (8, 3, 12, 5))]
    batched = sampler.generate(requests)
    alone = [sampler.generate([r])[0] for r in requests]
    assert [r.token_ids for r in batched] == [r.token_ids for r in alone]
    assert [r.finish_reason for r in batched] == [r.finish_reason for r in alone]
    for b, a in zip(batched, alone):
        torch.testing.assert_close(torch.tensor(b.logprobs), torch.tensor(a.logprobs), rtol=0, atol=1e-4)


def test_seeded_sampling_is_reproducible_across_batches():
    sampler = Sampler(TINY)  # the untrained init: a flat distribution, so draws vary with the seed
    prompt = chat_prompt("say something")
    req = GenRequest(prompt, max_tokens=10, temperature=1.0, seed=42)
    alone = sampler.generate([req])[0]
    in_batch = sampler.generate([GenRequest(chat_prompt("hi"), 4, temperature=0.7, seed=1), req,
                                 GenRequest(prompt, 10)])[1]
    assert alone.token_ids == in_batch.token_ids and len(alone.token_ids) == 10
    others = {tuple(sampler.generate([GenRequest(prompt, 10, temperature=1.0, seed=s)])[0].token_ids)
              for s in range(4)}
    assert len(others) == 4  # the seed matters
    nucleus = sampler.generate([GenRequest(prompt, 10, temperature=1.0, top_p=1e-6, seed=s) for s in range(2)])
    greedy = sampler.generate([GenRequest(prompt, 10)])[0]
    assert nucleus[0].token_ids == nucleus[1].token_ids == greedy.token_ids  # tiny top_p keeps the argmax only


def test_stop_strings_and_max_tokens(reversal_run):
    _, sampler, _, _ = reversal_run
    prompt = chat_prompt("reverse 1234")
    greedy = sampler.generate([GenRequest(prompt, max_tokens=8)])[0]
    assert greedy.token_ids == list(b"4321") + [catalogue.IM_END_ID]
    stopped, short, none = sampler.generate([
        GenRequest(prompt, 8, stop=["32"]), GenRequest(prompt, 2), GenRequest(prompt, 0)])
    assert stopped.token_ids == list(b"432") and stopped.finish_reason == "stop"
    assert stopped.matched_stop == "32"
    assert short.token_ids == list(b"43") and short.finish_reason == "length"
    assert none.token_ids == [] and none.finish_reason == "length"


def test_per_token_clip_thresholds_override_the_config(trainer):
    examples = policy_examples(trainer, n=2)
    for ex in examples:  # ratio e^1 on every token; clip only the first half of each datum
        ex.inputs["logprobs"] = ex.inputs["logprobs"] - 1.0
        n = len(ex.tokens)
        ex.inputs["clip_low_threshold"] = torch.full((n,), 0.8)
        ex.inputs["clip_high_threshold"] = torch.tensor([1.2] * (n // 2) + [10.0] * (n - n // 2))
    result = trainer.forward(examples, "ppo", {"clip_high_threshold": 100.0})
    halves = sum(len(ex.tokens) // 2 for ex in examples) / sum(len(ex.tokens) for ex in examples)
    assert result.metrics["clip_fraction:mean"] == pytest.approx(halves)


def test_unavailable_device_is_an_engine_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is present")
    with pytest.raises(EngineError, match="CUDA is not available"):
        Trainer(TINY, state_dir=tmp_path, device="cuda")


def test_optional_inputs_must_cover_every_datum(trainer):
    examples = policy_examples(trainer, n=2)
    examples[0].inputs["clip_high_threshold"] = torch.full((len(examples[0].tokens),), 1.5)
    with pytest.raises(EngineError, match="given for some datums but not for datum 1"):
        trainer.forward(examples, "ppo")
