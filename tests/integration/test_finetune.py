"""Fine-tuning a LoRA through a real swarm (two node processes of the tiny Llama): the loss
falls, the same seed gives the same run, and peft loads the saved adapter into the whole
model with the loss the client reported for it."""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import httpx
import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from protocol.credentials import Role
from tests.integration.conftest import MODEL_ID, Swarm, run_swarm, session_member
from tests.processes import wait_for
from tests.tiny_model import TINY_BLOCKS
from training.data import collate, read_examples
from training.settings import FinetuneSettings
from training.trainer import TrainResult, train_lora

pytestmark = pytest.mark.integration

QUESTIONS = [
    "What colour is the sky?",
    "Name a prime number.",
    "Where do penguins live?",
    "What is two plus two?",
    "Who wrote Hamlet?",
    "What is the capital of France?",
    "How many legs has a spider?",
    "Is water wet?",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A toy task: whatever the question, the answer is one fixed word."""
    path = tmp_path_factory.mktemp("finetune") / "train.jsonl"
    lines = [json.dumps({"prompt": f"Q: {q}\nA:", "completion": " banana"}) for q in QUESTIONS]
    path.write_text("\n".join(lines) + "\n")
    return path


def run(swarm: Swarm, data: Path, out: Path) -> tuple[TrainResult, str]:
    settings = FinetuneSettings(
        model_name=swarm.model_id,
        model_path=swarm.model_path,
        initial_peers=tuple(swarm.initial_peers),
        data=data,
        out=out,
        rank=4,
        alpha=8,
        targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        steps=15,
        lr=1e-2,
        batch_size=4,
        max_length=64,
        seed=7,
        membership=session_member(Role.FINETUNE),
    )
    progress = io.StringIO()
    return train_lora(settings, progress=progress), progress.getvalue()


@pytest.fixture(scope="module")
def trained(
    swarm: Swarm, data: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[TrainResult, str, Path]:
    """One training run; its adapter folder is named "banana", the id it is served by."""
    out = tmp_path_factory.mktemp("trained") / "banana"
    result, printed = run(swarm, data, out)
    return result, printed, out


def test_finetune_through_the_swarm(
    swarm: Swarm, data: Path, tmp_path: Path, trained: tuple[TrainResult, str, Path]
) -> None:
    first, printed, folder = trained
    assert "step 15/15" in printed and "s/step" in printed
    # The chain really crossed both servers.
    assert all(len(route) == 2 for route in first.routes)
    losses = first.losses
    assert len(losses) == 15
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3, losses
    assert first.final_loss < losses[0]

    second, _ = run(swarm, data, tmp_path / "again")
    assert second.losses == pytest.approx(losses, rel=1e-6, abs=1e-7)

    # peft loads the folder into the whole model, every key matched...
    base = AutoModelForCausalLM.from_pretrained(swarm.model_path, dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, folder).eval()
    assert not [w for w in caught if "missing" in str(w.message) or "nexpected" in str(w.message)]
    with safe_open(folder / "adapter_model.safetensors", "pt") as f:
        saved = set(f.keys())
    assert saved == set(get_peft_model_state_dict(model, save_embedding_layers=False))
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == swarm.model_id
    assert config["r"] == 4 and config["lora_alpha"] == 8

    # ...and gives, on the training data, the loss the client reported.
    tokenizer = AutoTokenizer.from_pretrained(swarm.model_path)
    ids, labels = collate(read_examples(data, tokenizer, 64), int(tokenizer.eos_token_id))
    with torch.no_grad():
        loss = model(input_ids=ids, labels=labels).loss
    assert float(loss) == pytest.approx(first.final_loss, abs=1e-4)


def test_the_trained_adapter_serves_through_chat_completions(
    tiny_model: Path, trained: tuple[TrainResult, str, Path], tmp_path: Path
) -> None:
    """Nodes started with the trained folder serve model "tiny:banana": the chat answer is
    exactly what peft's model with that adapter generates, and it learned the task."""
    _, _, folder = trained
    messages = [{"role": "user", "content": "Q: Is the moon made of cheese?\nA:"}]
    with run_swarm(
        tiny_model, tmp_path, [(0, 2), (2, TINY_BLOCKS)], "--adapters", str(folder)
    ) as served:
        wait_for(lambda: f"{MODEL_ID}:banana" in models(served), 60, "the adapter to be listed")
        body = {
            "model": f"{MODEL_ID}:banana",
            "messages": messages,
            "max_tokens": 4,
            "temperature": 0,
            "logprobs": True,
        }
        r = httpx.post(f"{served.base_url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    tokens = [entry["token"] for entry in choice["logprobs"]["content"]]

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, folder).eval()
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False
        )
    expected = [t for t in out[0, ids.shape[1] :].tolist() if t != tokenizer.eos_token_id]
    assert tokens == [tokenizer.decode([t]) for t in expected]
    assert "banana" in choice["message"]["content"]


def models(swarm: Swarm) -> list[str]:
    data = httpx.get(f"{swarm.base_url}/v1/models", timeout=10).json()["data"]
    return [card["id"] for card in data]
