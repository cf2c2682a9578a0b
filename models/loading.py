"""Build parts of a decoder-only Hugging Face model from its safetensors, reading only
the tensors each part needs: a span of transformer blocks for a server, the embedding,
final norm and LM head for the gateway.

Covers the Llama family layout (``model.layers.{i}``, ``model.embed_tokens``,
``model.norm``, ``lm_head``): Llama, Mistral, Qwen2, Mixtral.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "mixtral")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_config(folder: Path) -> PretrainedConfig:
    config: PretrainedConfig = AutoConfig.from_pretrained(folder)
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model type {config.model_type!r} is not supported yet "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    # sdpa is what `generate` uses by default; the same kernel keeps outputs identical.
    config._attn_implementation = "sdpa"
    return config


def _skeleton(config: PretrainedConfig) -> Any:
    """The model's module tree on the meta device: classes and shapes, no memory."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]


class _Weights:
    """Reads named tensors from a folder's safetensors files (sharded or not)."""

    def __init__(self, folder: Path) -> None:
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            self._file_of = {name: folder / file for name, file in weight_map.items()}
        else:
            single = folder / "model.safetensors"
            if not single.is_file():
                raise FileNotFoundError(f"no safetensors weights in {folder}")
            with safe_open(single, "pt") as f:
                names = f.keys()  # a safe_open handle, not a dict: `in f` does not work
                self._file_of = dict.fromkeys(names, single)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def read(self, prefix: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Every tensor whose name starts with ``prefix``, keyed by the rest of its name."""
        names = [n for n in self._file_of if n.startswith(prefix)]
        if not names:
            raise KeyError(f"no weights named {prefix}* in the checkpoint")
        out: dict[str, torch.Tensor] = {}
        for file in {self._file_of[n] for n in names}:
            with safe_open(file, "pt") as f:
                for name in names:
                    if self._file_of[name] == file:
                        out[name[len(prefix) :]] = f.get_tensor(name).to(dtype)
        return out


def _materialize(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    module.load_state_dict(state, strict=True, assign=True)
    return module.eval().requires_grad_(False)


@dataclass
class Span:
    """Blocks ``[start, end)`` with local layer indices 0..n-1 (their cache slots)."""

    config: PretrainedConfig
    start: int
    end: int
    layers: list[torch.nn.Module]
    rotary: torch.nn.Module
    dtype: torch.dtype


def load_span(folder: Path, start: int, end: int, dtype: torch.dtype = torch.float32) -> Span:
    config = load_config(folder)
    if not 0 <= start < end <= config.num_hidden_layers:
        raise ValueError(f"blocks {start}:{end} outside the model's 0:{config.num_hidden_layers}")
    skeleton = _skeleton(config)
    layer_cls = type(skeleton.model.layers[0])
    weights = _Weights(folder)
    layers = []
    for local, block in enumerate(range(start, end)):
        with torch.device("meta"):
            layer = layer_cls(config, layer_idx=local)
        layers.append(_materialize(layer, weights.read(f"model.layers.{block}.", dtype)))
    # Rotary tables are computed, not loaded, and stay fp32: casting them changes outputs.
    rotary = type(skeleton.model.rotary_emb)(config=config).eval()
    return Span(config, start, end, layers, rotary, dtype)


@dataclass
class Head:
    """The gateway's part of the model: token embedding, final norm and LM head (fp32)."""

    config: PretrainedConfig
    embed: torch.nn.Module
    norm: torch.nn.Module
    lm_head: torch.nn.Module


def load_head(folder: Path) -> Head:
    config = load_config(folder)
    skeleton = _skeleton(config)
    weights = _Weights(folder)
    dtype = torch.float32
    embed = _materialize(skeleton.model.embed_tokens, weights.read("model.embed_tokens.", dtype))
    norm = _materialize(skeleton.model.norm, weights.read("model.norm.", dtype))
    if "lm_head.weight" in weights:
        head_state = weights.read("lm_head.", dtype)
    else:  # tied embeddings: the checkpoint stores the matrix once
        head_state = {"weight": embed.get_parameter("weight")}
        if getattr(skeleton.lm_head, "bias", None) is not None:
            raise ValueError("tied LM head with a bias is not supported")
    lm_head = _materialize(skeleton.lm_head, head_state)
    return Head(config, embed, norm, lm_head)
