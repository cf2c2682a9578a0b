"""A tiny random-weight Llama with the embedded model's tokenizer, saved as an HF folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from models.resolve import resolve_model

TINY_BLOCKS = 4


def build_tiny_llama(
    folder: Path, *, seed: int = 0, intermediate_size: int = 128, initializer_range: float = 0.2
) -> Path:
    """The tiny Llama; ``initializer_range=0.02`` (a trained model's init) gives close
    logits, where numeric differences between a split and a whole model could flip greedy
    choices."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2").path)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=intermediate_size,
        num_hidden_layers=TINY_BLOCKS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        # Wide weights (the default) give well separated logits, so greedy choices are not
        # near-ties that ~1e-5 numeric differences between split and whole models could flip.
        initializer_range=initializer_range,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_lora_adapter(
    model: Path, folder: Path, *, seed: int = 1, targets: list[str] | None = None
) -> Path:
    """A peft LoRA adapter of ``model`` with non-zero weights on ``targets`` (default:
    every projection of a Llama block), saved as peft saves one; ``folder``'s name is its
    id."""
    import peft
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    torch.manual_seed(seed)
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets or LORA_TARGETS, init_lora_weights=False
    )
    peft.get_peft_model(base, config).save_pretrained(folder)
    return folder


def build_tiny_family(folder: Path, family: str, *, seed: int = 0) -> Path:
    """A tiny random model of ``family`` ("bloom", "falcon", "mixtral" or "qwen3") with the
    embedded model's tokenizer, saved as an HF folder that a whole swarm can serve."""
    from transformers import (
        BloomConfig,
        BloomForCausalLM,
        FalconConfig,
        FalconForCausalLM,
        MixtralConfig,
        MixtralForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2").path)
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        initializer_range=0.2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    llama_like = dict(
        common,
        intermediate_size=128,
        num_hidden_layers=TINY_BLOCKS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    if family == "bloom":
        model: Any = BloomForCausalLM(BloomConfig(**common, n_layer=TINY_BLOCKS, n_head=4))
    elif family == "falcon":  # falcon-40b style: grouped kv heads, rotary
        model = FalconForCausalLM(
            FalconConfig(
                **common,
                num_hidden_layers=TINY_BLOCKS,
                num_attention_heads=4,
                new_decoder_architecture=True,
                num_kv_heads=2,
                max_position_embeddings=1024,
            )
        )
    elif family == "mixtral":
        model = MixtralForCausalLM(
            MixtralConfig(**llama_like, num_local_experts=4, num_experts_per_tok=2)
        )
    elif family == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**llama_like, head_dim=16))
    else:
        raise ValueError(f"no tiny {family}")
    model.eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
