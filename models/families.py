"""What swarmgate needs to know about each model family's layout, keyed by
``config.model_type``: where its blocks, embedding, final norm and rotary table live, how
many key/value heads its cache receives, and how its attention runs on a node.

Two attention modes:

- ``packed``: the blocks' attention goes through transformers' ``AttentionInterface``, so a
  node can pack many sessions' tokens into one sequence and attend per session (Llama,
  Mistral, Qwen2, Qwen3, Mixtral).
- ``per_segment``: the attention is the module's own code (Falcon, BLOOM): it calls
  ``layer_past.update`` and applies a 4D mask and ALiBi it is handed, so each session's
  tokens run through the blocks on their own, with the inputs ``segment_inputs`` builds.

In every family here the module attribute paths and the checkpoint's weight names agree
(``transformer.h.3.mlp`` is both), so one set of names serves both.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from transformers import PretrainedConfig
from transformers.models.bloom import modeling_bloom
from transformers.models.falcon import modeling_falcon

SegmentInputs = Callable[[PretrainedConfig, int, int, torch.dtype], dict[str, Any]]
BlockState = Callable[[dict[str, torch.Tensor], PretrainedConfig], dict[str, torch.Tensor]]


def _as_saved(state: dict[str, torch.Tensor], config: PretrainedConfig) -> dict[str, torch.Tensor]:
    return state


def _mixtral_block_state(
    state: dict[str, torch.Tensor], config: PretrainedConfig
) -> dict[str, torch.Tensor]:
    """Mixtral checkpoints (the Hub's, and transformers' own ``save_pretrained``) keep one
    ``block_sparse_moe.experts.{e}.w1/w2/w3`` matrix per expert; the module holds them
    fused, as transformers' loader converts them: ``gate_up_proj`` [experts, 2 * inter,
    hidden] (w1 then w3) and ``down_proj`` [experts, hidden, inter]."""
    if "block_sparse_moe.gate.weight" not in state:
        return state  # already in the module's layout
    prefix = "block_sparse_moe."
    out = {name: t for name, t in state.items() if not name.startswith(prefix)}
    experts = range(config.num_local_experts)

    def stacked(w: str) -> torch.Tensor:
        return torch.stack([state[f"{prefix}experts.{e}.{w}.weight"] for e in experts])

    out["mlp.gate.weight"] = state[f"{prefix}gate.weight"]
    out["mlp.experts.gate_up_proj"] = torch.cat([stacked("w1"), stacked("w3")], dim=1)
    out["mlp.experts.down_proj"] = stacked("w2")
    return out


def _default_cache_heads(config: PretrainedConfig) -> int:
    heads = config.num_attention_heads
    return int(getattr(config, "num_key_value_heads", None) or heads)


def _falcon_cache_heads(config: PretrainedConfig) -> int:
    # The new decoder architecture (Falcon-40B style) broadcasts its kv heads to every
    # query head *before* the cache update, so the cache holds all of them; the classic
    # one is multi-query (one head) or plain multi-head.
    if config.new_decoder_architecture:
        return int(config.num_attention_heads)
    return 1 if config.multi_query else int(config.num_kv_heads)


def causal_allowed(queries: int, keys: int) -> torch.Tensor:
    """[1, 1, queries, keys] bool: the queries are the last ``queries`` of ``keys``."""
    offset = keys - queries
    rows = torch.arange(offset, keys).unsqueeze(1)
    return (torch.arange(keys).unsqueeze(0) <= rows)[None, None]


def _bloom_inputs(
    config: PretrainedConfig, queries: int, keys: int, dtype: torch.dtype
) -> dict[str, Any]:
    # What BloomModel builds for batch 1 with no padding: its own ALiBi (softmax is
    # shift-invariant, so the bias is per key, not per distance), and the eager additive mask.
    ones = torch.ones(1, keys, dtype=torch.long)
    alibi = modeling_bloom.build_alibi_tensor(ones, config.n_head, dtype)  # [heads, 1, keys]
    allowed = causal_allowed(queries, keys)
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return {"alibi": alibi, "attention_mask": mask}


def _falcon_inputs(
    config: PretrainedConfig, queries: int, keys: int, dtype: torch.dtype
) -> dict[str, Any]:
    # What FalconModel builds for SDPA: a materialized bool mask for rotary configs; for
    # ALiBi ones, the bias scaled and folded into a float mask (its own bf16-rounded slopes).
    allowed = causal_allowed(queries, keys)
    if not config.alibi:
        return {"alibi": None, "attention_mask": allowed}
    heads = config.num_attention_heads
    ones = torch.ones(1, keys, dtype=torch.long)
    alibi = modeling_falcon.build_alibi_tensor(ones, heads, dtype)  # [heads, 1, keys]
    scaled = alibi.reshape(1, heads, 1, keys) / math.sqrt(config.hidden_size // heads)
    mask = scaled.masked_fill(~allowed, torch.finfo(dtype).min)  # [1, heads, queries, keys]
    return {"alibi": alibi, "attention_mask": mask}


@dataclass(frozen=True)
class Family:
    """One layout. Paths are attributes of the causal-LM model and weight-name prefixes."""

    base: str  # the decoder model inside the causal LM ("model", "transformer")
    layers: str  # the block list, under ``base``
    embed: str  # token embedding, under ``base``
    norm: str  # final norm, under ``base``
    embed_norm: str | None = None  # a norm right after the embedding (BLOOM)
    rotary: str | None = "rotary_emb"  # the rotary table, under ``base``; None: no rotary
    # The implementation HF's own model runs with, which the modules' code branches on.
    attn_implementation: str = "sdpa"
    attention: Literal["packed", "per_segment"] = "packed"
    # per_segment only: extra block inputs (alibi, attention_mask) for ``queries`` new
    # tokens at the end of ``keys`` held ones.
    segment_inputs: SegmentInputs | None = None
    cache_heads: Callable[[PretrainedConfig], int] = _default_cache_heads
    # A block's checkpoint tensors → its module's state (names relative to the block).
    block_state: BlockState = _as_saved
    # The context length when the config names none (BLOOM's ALiBi has no table to bound it;
    # its models were trained on 2048 tokens).
    default_max_length: int | None = None

    @property
    def blocks_path(self) -> str:
        """Where the blocks sit in the causal LM, as module and weight names say it
        (``model.layers``, ``transformer.h``): block ``i`` is ``{blocks_path}.{i}``."""
        return f"{self.base}.{self.layers}"


_LLAMA_LIKE = Family(base="model", layers="layers", embed="embed_tokens", norm="norm")

FAMILIES: dict[str, Family] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "mixtral": replace(_LLAMA_LIKE, block_state=_mixtral_block_state),
    "falcon": Family(
        base="transformer",
        layers="h",
        embed="word_embeddings",
        norm="ln_f",
        attention="per_segment",
        segment_inputs=_falcon_inputs,
        cache_heads=_falcon_cache_heads,
    ),
    "bloom": Family(
        base="transformer",
        layers="h",
        embed="word_embeddings",
        norm="ln_f",
        embed_norm="word_embeddings_layernorm",
        rotary=None,
        attn_implementation="eager",  # BLOOM has no SDPA path: it adds the mask to scores
        attention="per_segment",
        segment_inputs=_bloom_inputs,
        default_max_length=2048,
    ),
}

SUPPORTED_MODEL_TYPES = tuple(FAMILIES)


def family_of(config: PretrainedConfig) -> Family:
    family = FAMILIES.get(config.model_type)
    if family is None:
        raise ValueError(
            f"model type {config.model_type!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    return family


def cache_heads(config: object) -> int:
    """Key/value heads per token that a block's cache update receives."""
    family = FAMILIES.get(str(getattr(config, "model_type", "")))
    if family is None:
        return _default_cache_heads(config)  # type: ignore[arg-type]
    return family.cache_heads(config)  # type: ignore[arg-type]
