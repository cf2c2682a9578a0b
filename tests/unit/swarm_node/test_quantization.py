"""Weight quantization of a span (int8, nf4) and chains that mix precisions.

Tolerances were measured on the tiny random Llama (4 blocks, hidden 64, logits up to ~9.4 in
magnitude) on ``PROMPTS``, against the same model unquantized in fp32:

| span            | max abs logit diff | relative L2 logit error |
| --------------- | ------------------ | ----------------------- |
| bfloat16        | 0.35               | 0.025                   |
| float32/int8    | 0.62               | 0.064                   |
| bfloat16/int8   | 0.88               | 0.072                   |
| float32/nf4     | 5.5                | 0.60                    |
| bfloat16/nf4    | 5.4                | 0.61                    |

The tiny model's wide random weights make it far more sensitive than a trained one (SmolLM2's
numbers are in the README). For scale: the blocks of the same model with another seed are
at a relative error of 1.43, so nf4 keeps most of the signal but is no stand-in for exactness.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from transformers import AutoTokenizer, MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralDecoderLayer

from models import quantization
from models.loading import Head, Span, load_head, load_span
from models.quantization import QuantizationError, module_bytes, quantize_blocks
from swarm_node.backend import forward_span, new_kv_buffers
from tests.tiny_model import build_tiny_llama

# int8 (LLM.int8(), activations quantized per row as well): measured 0.88 at worst.
INT8_MAX_LOGIT_DIFF = 1.5
INT8_MAX_REL_ERROR = 0.15  # measured 0.072
# nf4 is approximate: bound how far it drifts, never ask for the same tokens.
NF4_MAX_REL_ERROR = 0.8  # measured 0.61; an unrelated model is at 1.43

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "Water boils at",
    "1, 2, 3, 4,",
    "The quick brown fox jumps over the lazy dog. Then",
    "Explain why the sky is blue.",
    "import numpy as np\n",
]


@pytest.fixture(scope="module")
def head(tiny_model: Path) -> Head:
    return load_head(tiny_model)


@pytest.fixture(scope="module")
def prompts(tiny_model: Path) -> list[torch.Tensor]:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    return [tokenizer(p, return_tensors="pt")["input_ids"] for p in PROMPTS]


@pytest.fixture(scope="module")
def fp32_logits(tiny_model: Path, head: Head, prompts: list[torch.Tensor]) -> list[torch.Tensor]:
    return _logits(head, [load_span(tiny_model, 0, 4)], prompts)


@torch.inference_mode()
def _logits(head: Head, chain: list[Span], prompts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each prompt through every span of ``chain`` in turn, as hops would run it."""
    out = []
    for ids in prompts:
        hidden = head.embed(ids)
        for span in chain:
            hidden = forward_span(span, hidden, None)
        out.append(head.lm_head(head.norm(hidden))[0])
    return out


def _max_diff(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    return max((g - w).abs().max().item() for g, w in zip(got, want, strict=True))


def _rel_error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    return max(((g - w).norm() / w.norm()).item() for g, w in zip(got, want, strict=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_logits_stay_close_to_fp32(
    tiny_model: Path,
    head: Head,
    prompts: list[torch.Tensor],
    fp32_logits: list[torch.Tensor],
    dtype: torch.dtype,
) -> None:
    got = _logits(head, [load_span(tiny_model, 0, 4, dtype, "int8")], prompts)
    assert _max_diff(got, fp32_logits) <= INT8_MAX_LOGIT_DIFF
    assert _rel_error(got, fp32_logits) <= INT8_MAX_REL_ERROR


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_drifts_but_within_its_bound(
    tiny_model: Path,
    head: Head,
    prompts: list[torch.Tensor],
    fp32_logits: list[torch.Tensor],
    dtype: torch.dtype,
) -> None:
    got = _logits(head, [load_span(tiny_model, 0, 4, dtype, "nf4")], prompts)
    error = _rel_error(got, fp32_logits)
    assert 0 < error <= NF4_MAX_REL_ERROR


def test_a_chain_mixing_every_precision_runs_and_stays_near_fp32(
    tiny_model: Path, head: Head, prompts: list[torch.Tensor], fp32_logits: list[torch.Tensor]
) -> None:
    # One block per hop: fp32, bf16, int8 (fp32 compute), nf4 (bf16 compute). Hidden states
    # cross each hop in fp32, as they travel between servers.
    precisions = [
        (torch.float32, "none"),
        (torch.bfloat16, "none"),
        (torch.float32, "int8"),
        (torch.bfloat16, "nf4"),
    ]
    chain = [
        load_span(tiny_model, block, block + 1, dtype, quant)
        for block, (dtype, quant) in enumerate(precisions)
    ]
    got = _logits(head, chain, prompts)
    for logits, ids in zip(got, prompts, strict=True):
        assert logits.shape == (ids.shape[1], head.config.vocab_size)
        assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert _rel_error(got, fp32_logits) <= NF4_MAX_REL_ERROR


@torch.inference_mode()
def test_a_mixed_chain_decodes_with_its_caches_as_it_prefills(
    tiny_model: Path, head: Head, prompts: list[torch.Tensor]
) -> None:
    chain = [
        load_span(tiny_model, 0, 2, torch.bfloat16, "int8"),
        load_span(tiny_model, 2, 4, torch.float32, "nf4"),
    ]
    ids = prompts[0]
    whole = _logits(head, chain, [ids])[0]
    caches = [new_kv_buffers(span, span.start, span.end) for span in chain]
    for position in range(ids.shape[1]):
        hidden = head.embed(ids[:, position : position + 1])
        for span, kv in zip(chain, caches, strict=True):
            hidden = forward_span(span, hidden, kv, position=position)
        step = head.lm_head(head.norm(hidden))[0, -1]
        # A step of one token quantizes its activations alone, so it is near, not equal.
        assert step.argmax() == whole[position].argmax() or torch.allclose(
            step, whole[position], atol=INT8_MAX_LOGIT_DIFF
        )


@pytest.mark.parametrize(
    ("dtype", "quant"), [(torch.float32, "int8"), (torch.bfloat16, "nf4"), (torch.float32, "nf4")]
)
def test_the_kv_cache_and_untouched_weights_keep_the_compute_dtype(
    tiny_model: Path, dtype: torch.dtype, quant: str
) -> None:
    span = load_span(tiny_model, 0, 2, dtype, quant)
    assert new_kv_buffers(span, 0, 2).shape.dtype == dtype
    for layer in span.layers:
        assert layer.input_layernorm.weight.dtype == dtype
        assert type(layer.self_attn.q_proj) is not torch.nn.Linear
        assert not any(type(m) is torch.nn.Linear for m in layer.modules())


def test_quantized_blocks_take_less_memory(tiny_model: Path) -> None:
    sizes = {}
    for quant in ("none", "int8", "nf4"):
        span = load_span(tiny_model, 0, 1, torch.float32, quant)
        forward_span(span, torch.randn(1, 3, 64), None)  # nf4 repacks on its first forward
        sizes[quant] = module_bytes(span.layers[0])
    # Per weight: 4 bytes; 1 and a fp32 scale per row of 64; 1/2 and a bf16 absmax per 64.
    assert sizes["none"] / sizes["int8"] == pytest.approx(4 / (1 + 4 / 64), rel=0.05)
    assert sizes["int8"] / sizes["nf4"] == pytest.approx(2, rel=0.1)


def test_only_true_linears_are_quantized_in_a_mixtral_block() -> None:
    config = MixtralConfig(
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
    )
    layer = MixtralDecoderLayer(config, layer_idx=0).eval()
    experts = layer.mlp.experts.gate_up_proj.detach().clone()
    done = quantize_blocks([layer], "int8", torch.float32)
    assert done.linears == 4  # q, k, v, o: the experts are fused 3D parameters
    assert isinstance(layer.self_attn.q_proj, bnb.nn.Linear8bitLt)
    assert torch.equal(layer.mlp.experts.gate_up_proj, experts)
    assert layer.mlp.gate.weight.dtype == torch.float32  # the router decides, exactly
    assert done.kept_params > done.quantized_params


def test_none_changes_nothing_and_unknown_names_are_refused(tiny_model: Path) -> None:
    span = load_span(tiny_model, 0, 1)
    assert quantize_blocks(span.layers, "none", torch.float32).linears == 0
    assert type(span.layers[0].self_attn.q_proj) is torch.nn.Linear
    with pytest.raises(ValueError, match="fp4"):
        quantize_blocks(span.layers, "fp4", torch.float32)


@pytest.fixture
def fresh_hint() -> Iterator[None]:
    quantization._log_kernels_hint.cache_clear()
    yield
    quantization._log_kernels_hint.cache_clear()


def test_nf4_says_once_that_kernels_would_speed_it_up(
    tiny_model: Path,
    fresh_hint: None,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(quantization.importlib.util, "find_spec", lambda name: None)
    with caplog.at_level(logging.INFO, logger=quantization.__name__):
        load_span(tiny_model, 0, 1, torch.float32, "nf4")
        load_span(tiny_model, 1, 2, torch.float32, "nf4")
    hints = [r for r in caplog.records if "`kernels`" in r.getMessage()]
    assert len(hints) == 1


@pytest.fixture(scope="module")
def odd_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with an MLP of 96: down_proj's in_features is no multiple of 64."""
    return build_tiny_llama(tmp_path_factory.mktemp("odd"), intermediate_size=96)


def test_nf4_refuses_at_load_what_the_cpu_kernel_cannot_repack(
    odd_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(quantization, "_nf4_repacks_for_cpu", lambda bnb, device: True)
    with pytest.raises(QuantizationError) as refused:
        load_span(odd_model, 2, 4, torch.bfloat16, "nf4")
    message = str(refused.value)
    assert "block 2 mlp.down_proj (in_features 96, out_features 64)" in message
    assert "and 1 more" in message  # block 3's
    assert "--quant int8 or --quant none" in message
    # What it suggests serves the same span.
    span = load_span(odd_model, 2, 4, torch.float32, "int8")
    assert torch.isfinite(forward_span(span, torch.randn(1, 3, 64), None)).all()


def test_nf4_takes_any_shape_where_bitsandbytes_does_not_repack(
    odd_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(quantization, "_nf4_repacks_for_cpu", lambda bnb, device: False)
    span = load_span(odd_model, 0, 1, torch.float32, "nf4")  # a GPU, or a CPU without bf16
    assert isinstance(span.layers[0].mlp.down_proj, bnb.nn.Linear4bit)


@pytest.mark.skipif(
    not bnb.functional.has_avx512bf16(), reason="bitsandbytes repacks only on avx512_bf16"
)
@pytest.mark.parametrize(("in_features", "out_features"), [(96, 64), (64, 48)])
@torch.inference_mode()
def test_bitsandbytes_cpu_nf4_kernel_still_fails_on_such_shapes(
    in_features: int, out_features: int
) -> None:
    """Why the check exists. When this fails, bitsandbytes takes these shapes: drop it."""
    quant = bnb.nn.Linear4bit(in_features, out_features, bias=False, quant_type="nf4")
    quant = quant.to("cpu").eval()
    with pytest.raises((AssertionError, RuntimeError)):
        quant(torch.randn(2, in_features))
