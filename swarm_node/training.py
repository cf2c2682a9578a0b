"""Training through a span: LoRA forward and backward over blocks whose weights stay frozen.

Stateless, as Petals' ``rpc_forward``/``rpc_backward``: every call brings the client's
LoRA tensors, which become a peft adapter of their own on the span's layers for that call
only, and the backward recomputes the forward under autograd rather than keep activations
between calls. No I/O here; the handler reads, bounds and validates the call first and runs
these on the node's one compute thread, so that no inference forward ever runs while a
training adapter is active (nor while layers are being wrapped and unwrapped).

The layers may already carry peft adapters (served ones): the training adapter is added
beside them, made the only active one for the call, and afterwards removed, with every
layer's active adapters, disabled state and ``requires_grad`` flags put back as they were.
A projection that was a plain ``Linear`` gets that very module back, so an inference
forward after training runs exactly the code, and gives exactly the bits, it did before.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch

from models.devices import to_device, to_host
from models.loading import BlockLinear, Span
from models.lora import lora_shapes
from swarm_node.backend import run_span
from swarm_node.kv_buffers import Segment

if TYPE_CHECKING:  # imported on the first training call: peft takes seconds to import
    from peft.tuners.lora import LoraLayer

# Per call: what autograd keeps for the backward grows with tokens x blocks; these bound it
# (SmolLM2, 15 blocks, 4096 tokens: ~3 GB of activations) along with the input's size.
MAX_TRAIN_TOKENS = 4096  # batch x length
MAX_TRAIN_VALUES = 1 << 22  # batch x length x hidden (16 MiB of fp32 inputs)


@dataclass(frozen=True)
class LoraCall:
    """What a training call runs: blocks ``[start, end)`` with a LoRA of ``rank`` and
    ``alpha`` on ``targets`` (short names, all in ``linears``)."""

    start: int
    end: int
    rank: int
    alpha: int
    targets: tuple[str, ...]

    def shapes(self, linears: Mapping[str, BlockLinear]) -> list[tuple[int, int]]:
        return lora_shapes(linears, self.rank, self.targets, self.end - self.start)


def train_forward(
    span: Span,
    call: LoraCall,
    linears: Mapping[str, BlockLinear],
    lora: Sequence[torch.Tensor],
    hidden: torch.Tensor,
) -> torch.Tensor:
    """hidden: [B, n, H] → the blocks' output [B, n, H] (fp32) with the LoRA applied."""
    with _adapter(span, call, linears, lora), torch.no_grad():
        return to_host(_run(span, call, hidden))


def train_backward(
    span: Span,
    call: LoraCall,
    linears: Mapping[str, BlockLinear],
    lora: Sequence[torch.Tensor],
    hidden: torch.Tensor,
    grad_out: torch.Tensor,
    *,
    input_grad: bool = True,
) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """hidden, grad_out: [B, n, H] → (grad of hidden [B, n, H] or None without
    ``input_grad``, grads of the LoRA tensors in wire order), all fp32."""
    with _adapter(span, call, linears, lora) as params, torch.enable_grad():
        x = to_device(hidden.detach(), span.device).to(span.dtype).requires_grad_(input_grad)
        out = _run(span, call, x)
        wrt = [x, *params] if input_grad else list(params)
        grad_out = to_device(grad_out, out.device).to(out.dtype)
        grads = torch.autograd.grad(out, wrt, grad_outputs=grad_out)
    found = [to_host(g.float()) for g in grads]
    return (found[0], found[1:]) if input_grad else (None, found)


def _run(span: Span, call: LoraCall, hidden: torch.Tensor) -> torch.Tensor:
    """hidden [B, n, H]: B sequences, each from position 0, packed along the sequence
    dimension as one segment each (attention stays within a sequence)."""
    batch, length, size = hidden.shape
    segments = [Segment(None, 0, length)] * batch
    packed = hidden.reshape(1, batch * length, size)
    out = run_span(span, packed, segments, start=call.start, end=call.end)
    return out.reshape(batch, length, size)


@dataclass(frozen=True)
class _Wrapped:
    """A projection that peft wrapped for the call and that was a plain module before."""

    parent: torch.nn.Module
    attr: str
    original: torch.nn.Module


@contextmanager
def _adapter(
    span: Span, call: LoraCall, linears: Mapping[str, BlockLinear], lora: Sequence[torch.Tensor]
) -> Iterator[list[torch.nn.Parameter]]:
    """The call's LoRA as the only active adapter of blocks ``[start, end)``; yields its
    matrices in wire order (the only parameters that require grad meanwhile)."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    layers = span.layers[call.start - span.start : call.end - span.start]
    name = f"swarmgate-train-{uuid.uuid4().hex}"
    paths = [linears[t].path for t in call.targets]
    requires_grad = {p: p.requires_grad for layer in layers for p in layer.parameters()}
    states: dict[LoraLayer, tuple[list[str], bool]] = {
        m: (list(m.active_adapters), m.disable_adapters)
        for layer in layers
        for m in layer.modules()
        if isinstance(m, LoraLayer)
    }
    wrapped = [_plain(layer, path) for layer in layers for path in paths]
    config = LoraConfig(
        r=call.rank, lora_alpha=call.alpha, target_modules=paths, lora_dropout=0.0, bias="none"
    )
    try:
        # A throwaway container: peft marks the module it is given as a peft model
        # (``peft_config``), and served adapters may have marked the layers themselves.
        inject_adapter_in_model(config, torch.nn.ModuleList(layers), adapter_name=name)
        params = _load(layers, paths, name, lora)
        for layer in layers:
            for m in layer.modules():
                if isinstance(m, LoraLayer):
                    m.enable_adapters(True)
                    m.set_adapter(name)
        mine = set(params)
        for layer in layers:
            for p in layer.parameters():
                p.requires_grad_(p in mine)
        yield params
    finally:
        _remove(layers, name, wrapped, states, requires_grad)


def _plain(layer: torch.nn.Module, path: str) -> _Wrapped | None:
    from peft.tuners.lora import LoraLayer

    parent_path, _, attr = path.rpartition(".")
    parent = layer.get_submodule(parent_path) if parent_path else layer
    original = getattr(parent, attr)
    return None if isinstance(original, LoraLayer) else _Wrapped(parent, attr, original)


def _load(
    layers: Sequence[torch.nn.Module], paths: Sequence[str], name: str, lora: Sequence[torch.Tensor]
) -> list[torch.nn.Parameter]:
    params: list[torch.nn.Parameter] = []
    tensors = iter(lora)
    with torch.no_grad():
        for layer in layers:
            for path in paths:
                module = cast(Any, layer.get_submodule(path))  # a peft LoRA layer now
                for matrix in (module.lora_A[name].weight, module.lora_B[name].weight):
                    matrix.copy_(next(tensors))
                    params.append(matrix)
    return params


def _remove(
    layers: Sequence[torch.nn.Module],
    name: str,
    wrapped: Sequence[_Wrapped | None],
    states: Mapping[LoraLayer, tuple[list[str], bool]],
    requires_grad: Mapping[torch.nn.Parameter, bool],
) -> None:
    """Undo ``_adapter``, also after a failure halfway through it."""
    for plain in wrapped:  # peft's wrapper goes, adapter and all
        if plain is not None:
            setattr(plain.parent, plain.attr, plain.original)
    for m, (active, disabled) in states.items():
        # Reactivated first, so that deleting ours does not pick a new active adapter.
        m.set_adapter(active)
        m.enable_adapters(not disabled)
        if name in m.lora_A:
            m.delete_adapter(name)
    for p, flag in requires_grad.items():
        p.requires_grad_(flag)
