"""Fine-tuning a LoRA through a real swarm (two node processes of the tiny Llama): the loss
falls, the same seed gives the same run, and peft loads the saved adapter into the whole
model with the loss the client reported for it."""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.integration.conftest import Swarm, session_swarm_key
from training import FinetuneSettings, TrainResult, read_examples, train_lora
from training.data import collate

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
        swarm_key=session_swarm_key(),
    )
    progress = io.StringIO()
    return train_lora(settings, progress=progress), progress.getvalue()


def test_finetune_through_the_swarm(swarm: Swarm, data: Path, tmp_path: Path) -> None:
    first, printed = run(swarm, data, tmp_path / "a")
    assert "step 15/15" in printed and "s/step" in printed
    # The chain really crossed both servers.
    assert all(len(route) == 2 for route in first.routes)
    losses = first.losses
    assert len(losses) == 15
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3, losses
    assert first.final_loss < losses[0]

    second, _ = run(swarm, data, tmp_path / "b")
    assert second.losses == pytest.approx(losses, rel=1e-6, abs=1e-7)

    # peft loads the folder into the whole model, every key matched...
    base = AutoModelForCausalLM.from_pretrained(swarm.model_path, dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, tmp_path / "a").eval()
    assert not [w for w in caught if "missing" in str(w.message) or "nexpected" in str(w.message)]
    with safe_open(tmp_path / "a" / "adapter_model.safetensors", "pt") as f:
        saved = set(f.keys())
    assert saved == set(get_peft_model_state_dict(model, save_embedding_layers=False))
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == swarm.model_id
    assert config["r"] == 4 and config["lora_alpha"] == 8

    # ...and gives, on the training data, the loss the client reported.
    tokenizer = AutoTokenizer.from_pretrained(swarm.model_path)
    ids, labels = collate(read_examples(data, tokenizer, 64), int(tokenizer.eos_token_id))
    with torch.no_grad():
        loss = model(input_ids=ids, labels=labels).loss
    assert float(loss) == pytest.approx(first.final_loss, abs=1e-4)
