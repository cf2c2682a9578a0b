"""The client's LoRA: initialised as peft does, sliced per hop in wire order, and saved under
the very names peft saves an adapter with."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from models.families import family_of
from models.loading import block_linears, load_config
from models.lora import lora_shapes
from protocol.rpc import LoraSpec
from tests.tiny_model import TINY_BLOCKS, build_tiny_family
from training.lora import ClientLora, parse_targets

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SPEC = LoraSpec(rank=4, alpha=8, targets=TARGETS)


def saved_keys(folder: Path) -> set[str]:
    with safe_open(folder / "adapter_model.safetensors", "pt") as f:
        return set(f.keys())


def test_keys_match_what_peft_saves(tiny_model: Path, tmp_path: Path) -> None:
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM")
    get_peft_model(base, config).save_pretrained(tmp_path / "peft", save_embedding_layers=False)
    lora = ClientLora(block_linears(load_config(tiny_model)), TINY_BLOCKS, SPEC)
    lora.save(tmp_path / "ours", "tiny-llama")
    assert saved_keys(tmp_path / "ours") == saved_keys(tmp_path / "peft")
    ours = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert ours["base_model_name_or_path"] == "tiny-llama"
    assert (ours["r"], ours["lora_alpha"], ours["lora_dropout"]) == (4, 8, 0.0)
    assert sorted(ours["target_modules"]) == sorted(TARGETS)


def test_saved_tensors_load_into_peft(tiny_model: Path, tmp_path: Path) -> None:
    lora = ClientLora(block_linears(load_config(tiny_model)), TINY_BLOCKS, SPEC, seed=1)
    with torch.no_grad():
        for p in lora.parameters():
            p.add_(0.01)  # B non-zero too
    lora.save(tmp_path, "tiny-llama")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), tmp_path)
    layer = model.base_model.model.model.layers[2]
    a, b = lora.span(2, 3)[-2:]  # down_proj of block 2: the last pair of the block
    assert torch.equal(layer.mlp.down_proj.lora_A["default"].weight, a.detach())
    assert torch.equal(layer.mlp.down_proj.lora_B["default"].weight, b.detach())


def test_initialised_as_peft_does_and_seeded(tiny_model: Path) -> None:
    linears = block_linears(load_config(tiny_model))
    lora = ClientLora(linears, TINY_BLOCKS, SPEC, seed=5)
    again = ClientLora(linears, TINY_BLOCKS, SPEC, seed=5)
    other = ClientLora(linears, TINY_BLOCKS, SPEC, seed=6)
    assert all(
        torch.equal(p, q) for p, q in zip(lora.parameters(), again.parameters(), strict=True)
    )
    assert not torch.equal(lora.parameters()[0], other.parameters()[0])
    a, b = lora.parameters()[:2]
    assert torch.count_nonzero(b) == 0 and torch.count_nonzero(a) == a.numel()
    bound = 1 / a.shape[1] ** 0.5  # kaiming_uniform(a=sqrt(5)): U(-1/sqrt(fan_in), ..)
    assert float(a.abs().max()) <= bound


def test_span_is_in_wire_order(tiny_model: Path) -> None:
    linears = block_linears(load_config(tiny_model))
    lora = ClientLora(linears, TINY_BLOCKS, SPEC)
    span = lora.span(1, 3)
    assert [tuple(p.shape) for p in span] == lora_shapes(linears, 4, TARGETS, 2)
    assert span[0] is lora.parameters()[2 * len(TARGETS)]


def test_parse_targets() -> None:
    known = ["q_proj", "v_proj"]
    assert parse_targets("q_proj, v_proj", known) == known
    assert parse_targets("all", known) == known
    with pytest.raises(ValueError, match="lm_head"):
        parse_targets("q_proj,lm_head", known)


def test_keys_follow_the_family_as_peft_saves_them(tmp_path: Path) -> None:
    """BLOOM's blocks are transformer.h.{i}: a BLOOM adapter is saved under those names."""
    model = build_tiny_family(tmp_path / "bloom", "bloom")
    targets = ["query_key_value", "dense_h_to_4h"]
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="CAUSAL_LM")
    base = AutoModelForCausalLM.from_pretrained(model)
    get_peft_model(base, config).save_pretrained(tmp_path / "peft", save_embedding_layers=False)
    model_config = load_config(model)
    lora = ClientLora(
        block_linears(model_config),
        TINY_BLOCKS,
        LoraSpec(rank=4, alpha=8, targets=targets),
        blocks_path=family_of(model_config).blocks_path,
    )
    lora.save(tmp_path / "ours", "tiny-bloom")
    assert saved_keys(tmp_path / "ours") == saved_keys(tmp_path / "peft")
