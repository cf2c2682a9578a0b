"""The checks that matter, on the GPU: greedy output through spans vs `transformers`
`generate` on the same device and dtype, packed batches, LoRA, int8 and nf4, the KV budget,
and real swarms (failover included) whose nodes and gateway compute on the GPU.

What is compared, honestly: GPU kernels are not bitwise deterministic across batch shapes
and differ between code paths (our packed attention vs HF's SDPA call, split vs whole
weights), so logits are compared with a tolerance (fp32: 1e-3 absolute on logits of order
10; bf16: 0.25, a few bf16 steps) and greedy token ids exactly, on a tiny random model whose
logits are well separated (initializer_range 0.2), so that such differences cannot flip a
choice. int8 and nf4 change answers: they are checked to serve, on the device, with logits
near the unquantized ones, never token for token.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from gateway.engine.head import batch_logits, embed_ids
from models.adapters import attach_adapters, read_adapters, select_adapter
from models.loading import Head, Span, load_config, load_head, load_span
from swarm_node.backend import forward_packed, forward_span, new_kv_buffers
from swarm_node.kv_buffers import Segment
from swarm_node.throughput import measure_decode_throughput
from tests.tiny_model import TINY_BLOCKS

SPLITS = [(0, 1), (1, 3), (3, TINY_BLOCKS)]
NEW_TOKENS = 12
PROMPT = [1, 400, 401, 402, 403, 404, 405]
LOGIT_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 0.25}
QUANT_ERROR = {"int8": 0.1, "nf4": 0.5}  # relative, one block's output (CPU: 0.03, 0.28)
REPO = Path(__file__).resolve().parents[2]


def spans_on(
    model: Path, device: torch.device, dtype: torch.dtype, quant: str = "none"
) -> list[Span]:
    return [load_span(model, start, end, dtype, quant, device) for start, end in SPLITS]


@torch.inference_mode()
def through_spans(
    spans: list[Span], head: Head, prompt: list[int], adapter: str | None = None
) -> tuple[list[int], torch.Tensor]:
    """Greedy decoding as the swarm does it (host tensors between hops, the gateway's head
    functions): the ids and each step's logits [NEW_TOKENS, vocab] (fp32, host)."""
    caches = [new_kv_buffers(span, span.start, span.end) for span in spans]
    step, position, ids, logits = list(prompt), 0, [], []
    for _ in range(NEW_TOKENS):
        hidden = embed_ids(head, step)
        for span, kv in zip(spans, caches, strict=True):
            select_adapter(span, adapter)
            hidden = forward_span(span, hidden, kv, position=position)
            assert hidden.device.type == "cpu" and hidden.dtype == torch.float32  # for the wire
        position += len(step)
        logits.append(batch_logits(head, [hidden])[0])
        step = [int(logits[-1].argmax())]
        ids.append(step[0])
    return ids, torch.stack(logits)


@torch.inference_mode()
def generate(
    model: Path, device: torch.device, dtype: torch.dtype, adapter: Path | None = None
) -> tuple[list[int], torch.Tensor]:
    """`generate` on the whole model on the same device and dtype: ids and step logits."""
    runner = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).eval().to(device)
    if adapter is not None:
        import peft

        runner = peft.PeftModel.from_pretrained(runner, adapter).eval().to(device)
    out = runner.generate(
        input_ids=torch.tensor([PROMPT], device=device),
        attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long, device=device),
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    logits = torch.stack([step[0].float() for step in out.logits]).cpu()
    return out.sequences[0, len(PROMPT) :].tolist(), logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_greedy_through_spans_equals_generate_on_the_device(
    tiny_model: Path, device: torch.device, dtype: torch.dtype
) -> None:
    spans = spans_on(tiny_model, device, dtype)
    assert all(p.device.type == device.type for s in spans for p in s.layers[0].parameters())
    head = load_head(tiny_model, device, dtype)
    ids, logits = through_spans(spans, head, PROMPT)
    expected_ids, expected_logits = generate(tiny_model, device, dtype)
    assert ids == expected_ids
    assert (logits - expected_logits).abs().max() <= LOGIT_TOLERANCE[dtype]


def test_packed_sessions_equal_each_alone_on_the_device(
    tiny_model: Path, device: torch.device
) -> None:
    (span,) = [load_span(tiny_model, 0, TINY_BLOCKS, torch.float32, "none", device)]
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randn(1, n, 64, generator=generator) for n in (3, 7, 5)]
    steps = [torch.randn(1, 1, 64, generator=generator) for _ in prompts]
    alone, packed_kvs = [], []
    for prompt, step in zip(prompts, steps, strict=True):
        kv = new_kv_buffers(span, 0, TINY_BLOCKS)
        forward_span(span, prompt, kv)
        alone.append(forward_span(span, step, kv, position=prompt.shape[1]))
        packed_kv = new_kv_buffers(span, 0, TINY_BLOCKS)
        forward_span(span, prompt, packed_kv)
        packed_kvs.append(packed_kv)
    segments = [
        Segment(kv, prompt.shape[1], 1) for kv, prompt in zip(packed_kvs, prompts, strict=True)
    ]
    packed = forward_packed(span, torch.cat(steps, dim=1), segments, start=0, end=TINY_BLOCKS)
    assert (packed - torch.cat(alone, dim=1)).abs().max() <= 1e-4


def test_an_adapter_through_spans_answers_as_peft_on_the_device(
    tiny_model: Path, tiny_adapter: Path, device: torch.device
) -> None:
    spans = spans_on(tiny_model, device, torch.float32)
    adapters = read_adapters([tiny_adapter], load_config(tiny_model))
    for span in spans:
        attach_adapters(span, adapters)
    head = load_head(tiny_model, device)
    ids, _ = through_spans(spans, head, PROMPT, adapter="pirate")
    expected, _ = generate(tiny_model, device, torch.float32, adapter=tiny_adapter)
    assert ids == expected
    base, _ = through_spans(spans, head, PROMPT)
    assert base == generate(tiny_model, device, torch.float32)[0] != ids  # the adapter matters


@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_quantized_spans_serve_on_the_device(
    tiny_model: Path, device: torch.device, quant: str
) -> None:
    import bitsandbytes as bnb

    dtype = torch.bfloat16
    quantized = load_span(tiny_model, 0, 1, dtype, quant, device)
    linear = quantized.layers[0].mlp.down_proj
    kind = bnb.nn.Linear8bitLt if quant == "int8" else bnb.nn.Linear4bit
    assert isinstance(linear, kind)
    assert linear.weight.device.type == device.type
    assert linear.weight.dtype in (torch.int8, torch.uint8)  # quantized, not a float copy
    plain = load_span(tiny_model, 0, 1, dtype, "none", device)
    hidden = torch.randn(1, 6, 64, generator=torch.Generator().manual_seed(1))
    got = forward_span(quantized, hidden, new_kv_buffers(quantized, 0, 1))
    want = forward_span(plain, hidden, new_kv_buffers(plain, 0, 1))
    assert torch.isfinite(got).all()
    # Approximate by design: one block's output near the unquantized one (the residual
    # stream carries the input through), never claimed token-exact.
    assert float((got - want).norm() / want.norm()) < QUANT_ERROR[quant]


def test_throughput_and_kv_budget_come_from_the_device(
    tiny_model: Path, device: torch.device
) -> None:
    from swarm_node.node import GPU_CACHE_SHARE, default_cache_bytes

    span = load_span(tiny_model, 0, TINY_BLOCKS, torch.bfloat16, "none", device)
    assert measure_decode_throughput(span) > 0
    kv = new_kv_buffers(span, 0, TINY_BLOCKS)
    forward_span(span, torch.randn(1, 4, 64), kv)
    assert kv.view(0, 4)[0].device.type == device.type
    if device.type != "cuda":
        return
    free, _ = torch.cuda.mem_get_info(device)
    budget = default_cache_bytes(device)
    assert 0.8 * GPU_CACHE_SHARE * free <= budget <= GPU_CACHE_SHARE * free * 1.05


# Real swarms (DHT, nodes and gateway as processes) with every process on the device, in
# fp32 so that answers stay token-exact against the CPU reference the tests compute.
SWARM_TESTS = [
    "tests/integration/test_swarm_chat.py::test_greedy_output_equals_transformers_generate",
    "tests/integration/test_swarm_chat.py::test_concurrent_streams_each_equal_transformers_generate",
    "tests/integration/test_failover.py::test_a_stream_survives_its_server_dying_and_stays_token_exact",
    "tests/integration/test_push.py",
]


def test_real_swarms_on_the_device_stay_token_exact_and_fail_over(device: torch.device) -> None:
    if device.type != "cuda":
        pytest.skip("the same tests run on the CPU in the main suite")
    env = {**os.environ, "SWARMGATE_DEVICE": str(device), "SWARMGATE_DTYPE": "float32"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *SWARM_TESTS],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
