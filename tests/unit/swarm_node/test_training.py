"""Training through a span: gradients equal autograd through peft's own model of the same
blocks, base weights and inference outputs are untouched, adapters already on the layers
come back exactly as they were."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM

from models.loading import Span, block_linears, load_span
from swarm_node.backend import forward_span
from swarm_node.training import LoraCall, train_backward, train_forward
from tests.tiny_model import TINY_BLOCKS

TARGETS = ("q_proj", "v_proj", "o_proj", "down_proj")
RANK, ALPHA = 4, 8


@pytest.fixture(scope="module")
def span(tiny_model: Path) -> Span:
    return load_span(tiny_model, 0, TINY_BLOCKS)


@pytest.fixture(scope="module")
def peft_model(tiny_model: Path) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    model.config._attn_implementation = "sdpa"
    config = LoraConfig(
        r=RANK, lora_alpha=ALPHA, target_modules=list(TARGETS), init_lora_weights=False
    )
    torch.manual_seed(3)
    return get_peft_model(model, config).eval()


def lora_of(peft_model: torch.nn.Module, start: int, end: int) -> list[torch.Tensor]:
    """The peft model's LoRA matrices of blocks [start, end) in wire order."""
    layers = peft_model.base_model.model.model.layers
    linears = block_linears(peft_model.config)
    out = []
    for block in range(start, end):
        for target in TARGETS:
            module = layers[block].get_submodule(linears[target].path)
            out += [module.lora_A["default"].weight, module.lora_B["default"].weight]
    return out


def reference(
    peft_model: torch.nn.Module, start: int, end: int, hidden: torch.Tensor, grad: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Output, input grad and LoRA grads of blocks [start, end) of peft's model."""
    inner = peft_model.base_model.model.model
    x = hidden.clone().requires_grad_(True)
    positions = torch.arange(hidden.shape[1]).unsqueeze(0).expand(hidden.shape[0], -1)
    embeddings = inner.rotary_emb(x, positions)
    out = x
    for layer in inner.layers[start:end]:
        out = layer(
            out, attention_mask=None, position_ids=positions, position_embeddings=embeddings
        )
    params = lora_of(peft_model, start, end)
    grads = torch.autograd.grad(out, [x, *params], grad_outputs=grad)
    return out.detach(), grads[0], list(grads[1:])


def call_of(start: int, end: int) -> LoraCall:
    return LoraCall(start, end, RANK, ALPHA, TARGETS)


def sample(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, length, 64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("start", "end"), [(0, TINY_BLOCKS), (1, 3)])
def test_backward_matches_autograd_through_peft(
    span: Span, peft_model: torch.nn.Module, start: int, end: int
) -> None:
    hidden, grad = sample(3, 7, 1), sample(3, 7, 2)
    want_out, want_dx, want_dlora = reference(peft_model, start, end, hidden, grad)
    lora = [t.detach().clone() for t in lora_of(peft_model, start, end)]
    linears = block_linears(span.config)

    out = train_forward(span, call_of(start, end), linears, lora, hidden)
    dx, dlora = train_backward(span, call_of(start, end), linears, lora, hidden, grad)

    torch.testing.assert_close(out, want_out, atol=1e-5, rtol=1e-5)
    assert dx is not None
    torch.testing.assert_close(dx, want_dx, atol=1e-5, rtol=1e-5)
    assert len(dlora) == len(want_dlora) == 2 * len(TARGETS) * (end - start)
    for got, want in zip(dlora, want_dlora, strict=True):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_sequences_of_a_batch_stay_apart(span: Span, peft_model: torch.nn.Module) -> None:
    lora = [t.detach().clone() for t in lora_of(peft_model, 0, TINY_BLOCKS)]
    linears = block_linears(span.config)
    hidden = sample(2, 5, 4)
    both = train_forward(span, call_of(0, TINY_BLOCKS), linears, lora, hidden)
    alone = train_forward(span, call_of(0, TINY_BLOCKS), linears, lora, hidden[1:])
    # Other matmul shapes round differently (~1e-5); a leak between rows would be O(1).
    torch.testing.assert_close(both[1:], alone, atol=1e-4, rtol=1e-4)


def test_no_input_grad_when_not_asked(span: Span, peft_model: torch.nn.Module) -> None:
    lora = [t.detach().clone() for t in lora_of(peft_model, 0, 2)]
    dx, dlora = train_backward(
        span,
        call_of(0, 2),
        block_linears(span.config),
        lora,
        sample(1, 4, 5),
        sample(1, 4, 6),
        input_grad=False,
    )
    assert dx is None and len(dlora) == 2 * len(TARGETS) * 2


def snapshot(span: Span) -> dict[str, torch.Tensor]:
    return {
        f"{i}.{name}": p.detach().clone()
        for i, layer in enumerate(span.layers)
        for name, p in layer.named_parameters()
    }


def test_base_weights_and_inference_unchanged(
    tiny_model: Path, peft_model: torch.nn.Module
) -> None:
    span = load_span(tiny_model, 0, TINY_BLOCKS)
    prompt = sample(1, 9, 7)
    before_out = forward_span(span, prompt, None)
    before = snapshot(span)
    modules = [dict(layer.named_modules()) for layer in span.layers]
    lora = [t.detach().clone() for t in lora_of(peft_model, 0, TINY_BLOCKS)]
    linears = block_linears(span.config)

    train_backward(span, call_of(0, TINY_BLOCKS), linears, lora, sample(2, 6, 8), sample(2, 6, 9))
    train_forward(span, call_of(0, TINY_BLOCKS), linears, lora, sample(2, 6, 8))

    after = snapshot(span)
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        assert torch.equal(tensor, after[name]), name
    assert not any(p.requires_grad for layer in span.layers for p in layer.parameters())
    # The very same modules: nothing left wrapped.
    assert [dict(layer.named_modules()) for layer in span.layers] == modules
    assert torch.equal(forward_span(span, prompt, None), before_out)


def test_served_adapters_come_back_as_they_were(
    tiny_model: Path, peft_model: torch.nn.Module
) -> None:
    """Layers that already carry adapters (served ones): the training adapter alone runs
    during the call, and afterwards the layers' active adapters, disabled state, grads
    flags and outputs are what they were."""
    span = load_span(tiny_model, 0, TINY_BLOCKS)
    holder = torch.nn.ModuleList(span.layers)
    served = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "gate_proj"])
    served.init_lora_weights = False
    inject_adapter_in_model(served, holder, adapter_name="served")
    for layer in span.layers:
        for p in layer.parameters():
            p.requires_grad_(False)
    lora_layers = [m for layer in span.layers for m in layer.modules() if isinstance(m, LoraLayer)]
    lora_layers[0].enable_adapters(False)  # one layer's adapter switched off
    prompt = sample(1, 9, 10)
    before_out = forward_span(span, prompt, None)
    states = [(list(m.active_adapters), m.disable_adapters) for m in lora_layers]
    lora = [t.detach().clone() for t in lora_of(peft_model, 0, TINY_BLOCKS)]
    linears = block_linears(span.config)

    # Only the training adapter runs: the same gradients as peft's model without "served".
    hidden, grad = sample(2, 5, 11), sample(2, 5, 12)
    _, want_dx, want_dlora = reference(peft_model, 0, TINY_BLOCKS, hidden, grad)
    dx, dlora = train_backward(span, call_of(0, TINY_BLOCKS), linears, lora, hidden, grad)
    assert dx is not None
    torch.testing.assert_close(dx, want_dx, atol=1e-5, rtol=1e-5)
    for got, want in zip(dlora, want_dlora, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    after = [m for layer in span.layers for m in layer.modules() if isinstance(m, LoraLayer)]
    assert after == lora_layers
    assert [(list(m.active_adapters), m.disable_adapters) for m in after] == states
    assert all(set(m.lora_A) == {"served"} for m in after)
    assert not any(p.requires_grad for layer in span.layers for p in layer.parameters())
    assert torch.equal(forward_span(span, prompt, None), before_out)
