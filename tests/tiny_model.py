"""A tiny random-weight Llama with the embedded model's tokenizer, saved as an HF folder."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from models.resolve import resolve_model

TINY_BLOCKS = 4


def build_tiny_llama(folder: Path, *, seed: int = 0) -> Path:
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2").path)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=TINY_BLOCKS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        # Wide weights give well separated logits, so greedy choices are not near-ties that
        # ~1e-5 numeric differences between split and whole models could flip.
        initializer_range=0.2,
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
