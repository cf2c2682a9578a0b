"""Build parts of a decoder-only Hugging Face model from its safetensors, reading only
the tensors each part needs: a span of transformer blocks for a server, the embedding,
final norm and LM head for the gateway.

Every layout comes from ``models/families.py``: the Llama family (Llama, Mistral, Qwen2,
Qwen3, Mixtral), Falcon and BLOOM.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)

from models.devices import CPU, DTYPES
from models.families import SUPPORTED_MODEL_TYPES, Family, family_of
from models.quantization import (
    QuantizedSpan,
    check_quantizable,
    log_quantized,
    quantize_blocks,
)

__all__ = [
    "DTYPES",
    "SUPPORTED_MODEL_TYPES",
    "Head",
    "Span",
    "load_config",
    "load_head",
    "load_span",
]


def load_config(folder: Path) -> PretrainedConfig:
    config: PretrainedConfig = AutoConfig.from_pretrained(folder)
    family = family_of(config)
    # What `generate` runs with by default; the same kernels keep outputs identical.
    config._attn_implementation = family.attn_implementation
    if getattr(config, "max_position_embeddings", None) is None:
        # Sessions, records and the gateway size themselves by this one name.
        config.max_position_embeddings = family.default_max_length
    return config


def _skeleton(config: PretrainedConfig) -> Any:
    """The model's module tree on the meta device: classes and shapes, no memory."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]


@dataclass(frozen=True)
class BlockLinear:
    """A linear projection inside every transformer block: where it sits and its shape."""

    path: str  # within a block, e.g. "self_attn.q_proj"
    in_features: int
    out_features: int


def block_linears(config: PretrainedConfig) -> dict[str, BlockLinear]:
    """The linear projections of one block by short name (``q_proj``, ``down_proj``, ...):
    what LoRA may target. Read from the model's classes on the meta device, never from a
    loaded block, whose projections may already be wrapped by adapters."""
    layer = _module(_skeleton(config), family_of(config), family_of(config).layers)[0]
    found: dict[str, BlockLinear] = {}
    repeated: set[str] = set()  # per-expert projections: no single module to name
    for path, module in layer.named_modules():
        if isinstance(module, torch.nn.Linear):
            name = path.rsplit(".", 1)[-1]
            if name in found:
                repeated.add(name)
            found[name] = BlockLinear(path, module.in_features, module.out_features)
    return {name: linear for name, linear in found.items() if name not in repeated}


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

    @property
    def names(self) -> list[str]:
        return list(self._file_of)

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


def _read_part(
    weights: _Weights, family: Family, path: str, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """The tensors of ``path`` under the decoder model. A checkpoint saved from the bare
    decoder (as BLOOM's are) names them without the ``base.`` prefix."""
    prefix = f"{family.base}.{path}."
    if not any(name.startswith(prefix) for name in weights.names):
        prefix = f"{path}."
    return weights.read(prefix, dtype)


def _module(skeleton: Any, family: Family, path: str) -> Any:
    return skeleton.get_submodule(f"{family.base}.{path}")


@dataclass
class Span:
    """Blocks ``[start, end)``. Each block keeps its model-wide index as ``layer_idx``
    (per-layer settings such as Qwen's sliding layers are looked up by it); a cache slot is
    ``layer_idx`` minus the first block a step runs. ``rotary`` is None for models
    without rotary embeddings (ALiBi). ``lora``: the peft LoRA layers that served adapters
    were injected as (``models/adapters.py``), the ones a forward switches between."""

    config: PretrainedConfig
    start: int
    end: int
    layers: list[torch.nn.Module]
    rotary: torch.nn.Module | None
    dtype: torch.dtype
    lora: list[Any] = field(default_factory=list)  # peft LoraLayers (slow to import)
    device: torch.device = CPU  # where the blocks, their caches and their adapters live

    @property
    def family(self) -> Family:
        return family_of(self.config)


def load_span(
    folder: Path,
    start: int,
    end: int,
    dtype: torch.dtype = torch.float32,
    quant: str = "none",
    device: torch.device = CPU,
) -> Span:
    """Blocks ``[start, end)`` on ``device``, read one block at a time: the host holds at
    most one block beyond what it serves (nothing, on a GPU). bitsandbytes quantizes a
    weight as it moves from the host to its device, so quantized blocks are built on the
    host and moved block by block."""
    config = load_config(folder)
    family = family_of(config)
    if not 0 <= start < end <= config.num_hidden_layers:
        raise ValueError(f"blocks {start}:{end} outside the model's 0:{config.num_hidden_layers}")
    skeleton = _skeleton(config)
    layer_cls = type(_module(skeleton, family, family.layers)[0])
    weights = _Weights(folder)
    with torch.device("meta"):  # shapes only: the whole span is checked before it loads
        skeletons = [layer_cls(config, layer_idx=block) for block in range(start, end)]
    if quant != "none":
        check_quantizable(skeletons, quant, device, first_block=start)
    layers = []
    quantized: QuantizedSpan | None = None
    for block, layer in zip(range(start, end), skeletons, strict=True):
        saved = _read_part(weights, family, f"{family.layers}.{block}", dtype)
        layer = _materialize(layer, family.block_state(saved, config))
        done = quantize_blocks([layer], quant, dtype, first_block=block, device=device, log=False)
        quantized = done if quantized is None else quantized + done
        layers.append(layer.to(device))
    if quantized is not None:
        log_quantized(quantized, dtype)
    rotary = None
    if family.rotary is not None:
        # Rotary tables are computed, not loaded, and stay fp32: casting them changes outputs.
        rotary = type(_module(skeleton, family, family.rotary))(config=config).eval().to(device)
    return Span(config, start, end, layers, rotary, dtype, device=device)


@dataclass
class Head:
    """The gateway's part of the model: token embedding (with any norm the family applies
    right after it), final norm and LM head, on ``device`` in ``dtype`` (fp32 unless a
    process asks for less, as a GPU gateway does by default)."""

    config: PretrainedConfig
    embed: torch.nn.Module
    norm: torch.nn.Module
    lm_head: torch.nn.Module
    device: torch.device = CPU
    dtype: torch.dtype = torch.float32


def load_head(folder: Path, device: torch.device = CPU, dtype: torch.dtype = torch.float32) -> Head:
    config = load_config(folder)
    family = family_of(config)
    skeleton = _skeleton(config)
    weights = _Weights(folder)

    def part(path: str) -> torch.nn.Module:
        module = _materialize(
            _module(skeleton, family, path), _read_part(weights, family, path, dtype)
        )
        return module.to(device)

    tokens = part(family.embed)
    embed = (
        tokens
        if family.embed_norm is None
        else torch.nn.Sequential(tokens, part(family.embed_norm))
    )
    if "lm_head.weight" in weights:
        head_state = weights.read("lm_head.", dtype)
    else:  # tied embeddings: the checkpoint stores the matrix once
        head_state = {"weight": tokens.get_parameter("weight")}
        if getattr(skeleton.lm_head, "bias", None) is not None:
            raise ValueError("tied LM head with a bias is not supported")
    lm_head = _materialize(skeleton.lm_head, head_state).to(device)
    return Head(config, embed, part(family.norm), lm_head, device, dtype)


def load_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    """The tokenizer of the model in ``folder`` (gateways and fine-tuners need it; servers,
    which see hidden states only, never do)."""
    return AutoTokenizer.from_pretrained(folder)
