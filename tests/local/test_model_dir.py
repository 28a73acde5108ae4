"""Real checkpoints: ``local up --model-dir [NAME=]DIR`` serves and trains the weights
of a Hugging Face checkpoint written here with ``save_pretrained`` (and the shipped
tokenizer saved beside it), not a seeded stand-in. The expected numbers come from
the same directory loaded in this process with transformers' own
``from_pretrained`` and a plain, uncached forward pass per token."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest
import torch
from click.testing import CliRunner

from runner.cli import main
from runner.local import catalogue

CKPT_NAME = "tiny-ckpt"


def _write_checkpoint(directory: Path, architecture: str = "qwen3", tie: bool = True) -> Path:
    from transformers import (AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM,
                              Qwen3Config, Qwen3ForCausalLM)

    config_class, model_class = {"qwen3": (Qwen3Config, Qwen3ForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
                                 "llama": (LlamaConfig, LlamaForCausalLM)}[architecture]
    config = config_class(vocab_size=catalogue.VOCAB_SIZE, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          num_key_value_heads=1, head_dim=16, intermediate_size=64, max_position_embeddings=384,
                          tie_word_embeddings=tie, eos_token_id=catalogue.IM_END_ID,
                          pad_token_id=catalogue.ENDOFTEXT_ID, initializer_range=0.5)
    torch.manual_seed(1234)  # a wide init: a peaked distribution, so greedy tokens tell weights apart
    model_class(config).save_pretrained(directory)
    AutoTokenizer.from_pretrained(catalogue.tokenizer_path()).save_pretrained(directory)
    return directory


def _reference(directory: Path, prompt: list[int], max_tokens: int) -> tuple[list[int], list[float]]:
    """Greedy tokens and their logprobs from the checkpoint loaded by transformers itself."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    tokens, logprobs = list(prompt), []
    with torch.no_grad():
        for _ in range(max_tokens):
            row = torch.log_softmax(model(input_ids=torch.tensor([tokens])).logits[0, -1].float(), dim=-1)
            token = int(torch.argmax(row))
            tokens.append(token)
            logprobs.append(float(row[token]))
            if token == catalogue.IM_END_ID:
                break
    return tokens[len(prompt):], logprobs


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return _write_checkpoint(tmp_path_factory.mktemp("checkpoints") / CKPT_NAME)


def test_local_up_serves_and_trains_a_checkpoint(checkpoint, tmp_path, sdk_helpers):
    from fireworks.training import tinker

    from runner.local import supervisor

    runner = CliRunner()
    state_dir = str(tmp_path / "local")
    up = runner.invoke(main, ["local", "up", "--state-dir", state_dir, "--model-dir", str(checkpoint),
                              "--model-dir", f"accounts/fireworks/models/qwen3-0p6b={checkpoint}"])
    assert up.exit_code == 0, up.output
    printed = json.loads(up.output)
    try:
        assert printed["base_model"] == f"accounts/local/models/{CKPT_NAME}"
        assert printed["tokenizer_path"] == str(checkpoint.resolve())
        assert printed["training_shape_id"] == f"accounts/fireworks/trainingShapes/ts-{CKPT_NAME}-policy"
        for name in (printed["base_model"], "accounts/fireworks/models/qwen3-0p6b"):  # a managed name, mapped
            assert httpx.get(f"{printed['base_url']}/v1/{name}").json()["contextLength"] == 384

        info = supervisor.running(state_dir)
        service = sdk_helpers.make_service(info)
        try:
            from transformers import AutoTokenizer
            tokenizer = AutoTokenizer.from_pretrained(info.tokenizer_path)
            prompt = sdk_helpers.chat_prompt(tokenizer, "hello there")
            expected_tokens, expected_logprobs = _reference(checkpoint, prompt, max_tokens=8)

            # The trainer holds the checkpoint's weights...
            training = service.create_training_client()
            described = training.get_info().model_data  # the trainer describes the checkpoint, not a stand-in
            assert (described.arch, described.tokenizer_id) == ("Qwen3ForCausalLM", str(checkpoint.resolve()))
            full = prompt + expected_tokens
            datum = tinker.Datum(model_input=tinker.ModelInput.from_ints(full[:-1]), loss_fn_inputs={
                "target_tokens": tinker.TensorData(data=full[1:], dtype="int64", shape=[len(full) - 1])})
            trained = training.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].data
            assert trained[len(prompt) - 1:] == pytest.approx(expected_logprobs, abs=1e-4)

            # ... and so does the deployment that serves its snapshot (the seed's snapshot name).
            saved = training.save_weights_for_sampler("step_00000").result()
            sampler = service.create_deployment_sampler(model_path=saved.path, tokenizer=tokenizer)
            [completion] = asyncio.run(sampler.sample_with_prompt_tokens(prompt, n=1, max_tokens=8, temperature=0.0,
                                                                         logprobs=True))
            assert completion.full_tokens[len(prompt):] == expected_tokens
            assert completion.inference_logprobs == pytest.approx(expected_logprobs, abs=1e-4)

            # One training step moves the trainer away from the checkpoint.
            training.forward_backward([datum], "cross_entropy").result()
            training.optim_step(tinker.AdamParams(learning_rate=1e-2)).result()
            after = training.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].data
            assert sum(after) > sum(trained)
        finally:
            service.close()

        # The state dir remembers its checkpoint: a plain `up` after `down` serves it again.
        assert runner.invoke(main, ["local", "down", "--state-dir", state_dir]).exit_code == 0
        again = runner.invoke(main, ["local", "up", "--state-dir", state_dir])
        assert again.exit_code == 0, again.output
        assert json.loads(again.output)["base_model"] == printed["base_model"]
    finally:
        runner.invoke(main, ["local", "down", "--state-dir", state_dir])


def _break(directory: Path, how: str) -> str:
    """Spoil a copy of a good checkpoint one way; returns the --model-dir argument."""
    config_file = directory / "config.json"
    if how == "no config":
        config_file.unlink()
    elif how in ("architecture", "vocab_size"):
        config = json.loads(config_file.read_text())
        if how == "architecture":
            config["architectures"] = ["GPT2LMHeadModel"]
        else:
            del config["vocab_size"]
        config_file.write_text(json.dumps(config))
    elif how == "no weights":
        (directory / "model.safetensors").unlink()
    elif how == "no tokenizer":
        (directory / "tokenizer.json").unlink()
        (directory / "tokenizer_config.json").unlink()
    elif how == "bad name":
        return f"accounts/Bad Name/models/x={directory}"
    return str(directory)


@pytest.mark.parametrize("how, message", [
    ("no config", "no config.json"), ("architecture", "architectures is ['GPT2LMHeadModel']"),
    ("vocab_size", "vocab_size must be a positive integer"), ("no weights", "no *.safetensors"),
    ("no tokenizer", "no tokenizer"), ("bad name", "accounts/<account>/models/<id>")])
def test_a_bad_model_dir_is_a_cli_error_and_starts_nothing(checkpoint, tmp_path, how, message):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    state_dir = tmp_path / "local"
    result = CliRunner().invoke(main, ["local", "up", "--state-dir", str(state_dir), "--model-dir",
                                       _break(broken, how)])
    assert result.exit_code == 1
    assert message in result.output
    assert not state_dir.exists()


def test_a_running_service_without_the_checkpoint_is_not_reused(checkpoint, service_info):
    from runner.local import supervisor

    with pytest.raises(supervisor.ServiceError, match="does not serve --model-dir"):
        supervisor.ensure_running(service_info.state_dir, model_dirs={f"accounts/local/models/{CKPT_NAME}":
                                                                      str(checkpoint)})


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_other_supported_architectures_generate_and_train(tmp_path, architecture):
    """The engine on its own: each supported architecture's checkpoint, as transformers computes it."""
    from runner.local.engine import Datum, GenRequest, Sampler, Trainer

    directory = _write_checkpoint(tmp_path / f"{architecture}-ckpt", architecture, tie=False)
    card = catalogue.load_model_dir(directory, f"accounts/test/models/{architecture}-ckpt")
    catalogue.register(card)
    prompt = [catalogue.IM_START_ID, *b"user\nhi", catalogue.IM_END_ID]
    expected_tokens, expected_logprobs = _reference(directory, prompt, max_tokens=6)
    [out] = Sampler(card.name).generate([GenRequest(prompt, max_tokens=6)])
    assert out.token_ids == expected_tokens
    assert out.logprobs == pytest.approx(expected_logprobs, abs=1e-4)
    full = prompt + expected_tokens
    trained = Trainer(card.name, state_dir=tmp_path).forward([Datum(full[:-1], {
        "target_tokens": torch.tensor(full[1:])})]).logprobs[0]
    assert trained[len(prompt) - 1:].tolist() == pytest.approx(expected_logprobs, abs=1e-4)
