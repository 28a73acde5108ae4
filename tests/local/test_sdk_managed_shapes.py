"""The managed service's training-shape names resolve on the local service, through the
unmodified SDK's own calls (``resolve_training_profile``: ``trainingShapes/{s}/versions``):
the seed's ``qwen3-8b-128k-h200`` and the cookbook's Qwen3.5 / Qwen3.6 names, by the
pattern ``<model>-<context>k[-<accelerator>][-lora]``, each to the local model of its
family in its own transformers architecture, LoRA for ``-lora``; a family without a local
model is a 404 that says what is served and how to serve your own checkpoint."""

from __future__ import annotations

import pytest
from fireworks.training import tinker
from fireworks.training.sdk import FireworksClient

SHAPES = {  # name -> (base model, trainer mode, the model's transformers architecture)
    "qwen3-8b-128k-h200": ("accounts/fireworks/models/qwen3-8b", "POLICY_TRAINER", "Qwen3ForCausalLM"),
    "qwen3p5-9b-256k": ("accounts/fireworks/models/qwen3p5-9b", "POLICY_TRAINER", "Qwen3_5ForCausalLM"),
    "qwen3p5-9b-256k-lora": ("accounts/fireworks/models/qwen3p5-9b", "LORA_TRAINER", "Qwen3_5ForCausalLM"),
    "qwen3p5-9b-65k-lora": ("accounts/fireworks/models/qwen3p5-9b", "LORA_TRAINER", "Qwen3_5ForCausalLM"),
    "qwen3p6-35b-a3b-256k-lora": ("accounts/fireworks/models/qwen3p6-35b-a3b", "LORA_TRAINER",
                                  "Qwen3_5MoeForCausalLM"),
}


@pytest.fixture(scope="module")
def client(service_info):
    with FireworksClient(api_key="local", base_url=service_info.base_url) as fireworks:
        yield fireworks


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_every_managed_shape_name_resolves_to_its_family(client, http, shape):
    base_model, mode, architecture = SHAPES[shape]
    profile = client.resolve_training_profile(f"accounts/fireworks/trainingShapes/{shape}")
    assert profile.training_shape_version == f"accounts/fireworks/trainingShapes/{shape}/versions/v1"
    assert profile.trainer_mode == mode
    model = http.get(f"/v1/{base_model}").json()
    # The shape serves its family's model at that model's context (the stand-ins' is small).
    assert 0 < profile.max_supported_context_length == model["contextLength"]
    assert model["baseModelDetails"]["moe"] is (architecture == "Qwen3_5MoeForCausalLM")
    version = http.get(f"/v1/accounts/fireworks/trainingShapes/{shape}/versions/v1").json()
    assert version["snapshot"]["baseModel"] == base_model
    assert version["snapshot"]["loraSupported"] is (mode == "LORA_TRAINER")


def test_a_family_without_a_local_model_is_a_404_naming_what_is_served(client, http):
    with pytest.raises(RuntimeError, match="HTTP 404") as refused:
        client.resolve_training_profile("accounts/fireworks/trainingShapes/kimi-k3-256k-b200-lora")
    message = str(refused.value)
    assert "accounts/fireworks/models/kimi-k3" in message
    assert "qwen3-8b" in message and "qwen3p5-9b" in message and "qwen3p6-35b-a3b" in message
    assert "local up --model-dir accounts/fireworks/models/kimi-k3=DIR" in message
    # The invented names keep working, and a name that fits no pattern says which do.
    assert http.get("/v1/accounts/fireworks/trainingShapes/ts-qwen3-8b-lora/versions").status_code == 200
    odd = http.get("/v1/accounts/fireworks/trainingShapes/not_a_shape/versions").json()["error"]["message"]
    assert "<model>-<context>k[-<accelerator>][-lora]" in odd


def test_a_lora_shape_of_the_moe_family_trains_adapters_only(provision, tokenizer, http, sdk_helpers):
    service = provision(base_model="accounts/fireworks/models/qwen3p6-35b-a3b", lora_rank=8,
                        training_shape_id="accounts/fireworks/trainingShapes/qwen3p6-35b-a3b-256k-lora")
    training = service.create_training_client(lora_rank=8)
    job = http.get(f"/v1/accounts/local/rlorTrainerJobs/{service.trainer_job_id}").json()
    assert job["trainingShape"] == "accounts/fireworks/trainingShapes/qwen3p6-35b-a3b-256k-lora/versions/v1"
    prompt = sdk_helpers.chat_prompt(tokenizer, "hi")
    data = [sdk_helpers.sft_datum(prompt, list(b"yo") + [tokenizer.convert_tokens_to_ids("<|im_end|>")])]
    before = training.forward(data, "cross_entropy").result().metrics["loss:sum"]
    for _ in range(2):
        training.forward_backward(data, "cross_entropy").result()
        training.optim_step(tinker.AdamParams(learning_rate=1e-2)).result()
    assert training.forward(data, "cross_entropy").result().metrics["loss:sum"] < before
    trainer = http.get(f"/training/v1/rlorTrainerJobs/local/{service.trainer_job_id}/api/v1/local/optimizer").json()
    assert trainer["lora_rank"] == 8
    assert 0 < trainer["optimizer_parameters"] == trainer["trainable_parameters"] < trainer["parameters"] / 5
    info = training.get_info()
    assert info.model_data.arch == "Qwen3_5MoeForCausalLM"
