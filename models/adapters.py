"""LoRA adapters (peft) on a span of blocks: read and check at start, select per forward.

A node serves the base model and any number of adapters on the same weights. Each
adapter is injected with peft into the span's own layers under its name (the folder's
name), and every forward first selects the adapter of the sessions it runs: none for the
base model. Selecting is cheap (flags on the LoRA layers), so forwards of different
adapters interleave freely; a forward never mixes two (see swarm_node/batching.py).

Everything that can be wrong with an adapter is found here, before the node announces
anything: a folder that is not a peft adapter, an adapter that is not LoRA, one trained
for another base model (its layers or shapes do not fit this one).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from safetensors.torch import load_file
from transformers import PretrainedConfig

from models.families import family_of
from models.loading import Span
from models.lora import PEFT_PREFIX
from protocol.swarm import ADAPTER_PATTERN, MAX_ADAPTERS

if TYPE_CHECKING:  # peft (and the bitsandbytes it loads) takes seconds to import
    import peft
    from peft.tuners.lora import LoraLayer

ADAPTER_NAME = re.compile(ADAPTER_PATTERN)  # it becomes part of a model id


class AdapterError(ValueError):
    """An adapter this node cannot serve; the message names it and says why."""


@dataclass(frozen=True)
class Adapter:
    name: str
    path: Path
    config: peft.LoraConfig
    weights: dict[str, torch.Tensor]  # the model's tensor names, without peft's prefix
    blocks: dict[str, int]  # tensor name → the block it adapts


def read_adapter(folder: Path, config: PretrainedConfig) -> Adapter:
    """Read one peft adapter folder of the model ``config`` describes, and check what can
    be checked without its weights."""
    import peft

    num_blocks = int(config.num_hidden_layers)
    in_block = re.compile(rf"^{re.escape(family_of(config).blocks_path)}\.(\d+)\.")
    folder = Path(folder)
    name = folder.resolve().name
    if not ADAPTER_NAME.match(name):
        raise AdapterError(
            f"adapter {folder}: its folder name {name!r} is its id and must be 1-64 letters, "
            "digits, '_', '.' or '-'"
        )
    if not (folder / "adapter_config.json").is_file():
        raise AdapterError(
            f"adapter {name!r} ({folder}): no adapter_config.json, not a peft adapter"
        )
    try:
        lora = peft.PeftConfig.from_pretrained(str(folder))
    except Exception as e:
        raise AdapterError(
            f"adapter {name!r} ({folder}): unreadable adapter_config.json: {e}"
        ) from None
    if not isinstance(lora, peft.LoraConfig):
        raise AdapterError(
            f"adapter {name!r} ({folder}) is a {lora.peft_type} adapter; only LoRA adapters "
            "are served"
        )
    weights_file = folder / "adapter_model.safetensors"
    if not weights_file.is_file():
        raise AdapterError(f"adapter {name!r} ({folder}): no adapter_model.safetensors")
    weights = {key.removeprefix(PEFT_PREFIX): t for key, t in load_file(weights_file).items()}
    blocks: dict[str, int] = {}
    for key in weights:
        match = in_block.match(key)
        if match is None:
            raise AdapterError(
                f"adapter {name!r} ({folder}) adapts {key.removesuffix('.weight')}, which is "
                "not in a transformer block of this model; only adapters of the blocks are served"
            )
        blocks[key] = int(match.group(1))
    deepest = max(blocks.values(), default=0)
    if deepest >= num_blocks:
        raise AdapterError(
            f"adapter {name!r} ({folder}) adapts block {deepest} but this model has "
            f"{num_blocks} blocks: it was made for another base model"
        )
    return Adapter(name, folder, lora, weights, blocks)


def read_adapters(folders: Sequence[Path], config: PretrainedConfig) -> list[Adapter]:
    if len(folders) > MAX_ADAPTERS:
        raise AdapterError(f"{len(folders)} adapters; a node serves {MAX_ADAPTERS} at most")
    adapters = [read_adapter(folder, config) for folder in folders]
    names = [a.name for a in adapters]
    for name in names:
        if names.count(name) > 1:
            raise AdapterError(f"two adapters are named {name!r}; their folder names must differ")
    return adapters


def _block_tree(span: Span) -> torch.nn.Module:
    """The span's layers under the names they have in the whole model
    (``model.layers.{block}``, ``transformer.h.{block}``), which is how adapters name
    their targets."""
    root, decoder = torch.nn.Module(), torch.nn.Module()
    root.add_module(span.family.base, decoder)
    blocks = zip(range(span.start, span.end), span.layers, strict=True)
    decoder.add_module(span.family.layers, torch.nn.ModuleDict({str(b): m for b, m in blocks}))
    return root


def attach_adapters(span: Span, adapters: Sequence[Adapter]) -> None:
    """Inject every adapter into the span's layers, base weights untouched; afterwards
    the base model is selected."""
    if not adapters:
        return  # nor import peft (and the bitsandbytes it loads): over a second per start
    import peft

    tree = _block_tree(span)
    for adapter in adapters:
        ours = {
            key: tensor.to(span.dtype)
            for key, tensor in adapter.weights.items()
            if span.start <= adapter.blocks[key] < span.end
        }
        if not ours:
            continue  # it adapts none of these blocks: here it is the base model
        try:
            peft.inject_adapter_in_model(
                adapter.config, tree, adapter_name=adapter.name, state_dict=ours
            )
            loaded: Any = peft.set_peft_model_state_dict(tree, ours, adapter_name=adapter.name)
        except (RuntimeError, ValueError, KeyError) as e:
            raise AdapterError(
                f"adapter {adapter.name!r} ({adapter.path}) does not fit this model: it was "
                f"made for another base model ({_first_line(e)})"
            ) from None
        missing = [key for key in loaded.missing_keys if f".{adapter.name}." in key]
        if missing or loaded.unexpected_keys:
            raise AdapterError(
                f"adapter {adapter.name!r} ({adapter.path}) does not fit this model: it was made "
                f"for another base model (missing {missing[:3]}, unexpected "
                f"{list(loaded.unexpected_keys)[:3]})"
            )
    span.lora = list(lora_layers(span))
    select_adapter(span, None)


def lora_layers(span: Span) -> Iterator[LoraLayer]:
    if "peft" not in sys.modules:
        return  # nothing imported peft, so no layer carries an adapter
    from peft.tuners.lora import LoraLayer

    for layer in span.layers:
        for module in layer.modules():
            if isinstance(module, LoraLayer):
                yield module


def select_adapter(span: Span, name: str | None) -> None:
    """Make the span's next forwards run adapter ``name``, or the base model (None).
    Call on the thread that runs the forwards, right before them. Switches the layers
    ``attach_adapters`` made (``span.lora``): walking every module of every block to find
    them took ~0.1 ms of each forward, on a span with no adapter at all."""
    for module in cast("list[LoraLayer]", span.lora):
        if name is None:
            module.enable_adapters(False)
        else:
            module.enable_adapters(True)
            module.set_adapter(name, inference_mode=True)


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
