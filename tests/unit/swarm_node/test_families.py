"""Every supported family through the span interface: a chain of spans decodes exactly
what the whole Hugging Face model generates, packed steps equal each session alone, spans
read only their own blocks, and gradients flow through a span without caches."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    BloomConfig,
    BloomForCausalLM,
    FalconConfig,
    FalconForCausalLM,
    GPT2Config,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from gateway.engine.head import batch_logits, embed_ids
from models import loading
from models.loading import Head, Span, load_config, load_head, load_span
from swarm_node.backend import forward_packed, forward_span, new_kv_buffers, run_span
from swarm_node.kv_buffers import KVShape, Segment
from swarm_node.throughput import measure_decode_throughput
from tests.unit.swarm_node.support import HIDDEN, inputs, reference

BLOCKS = 4
VOCAB = 256
NEW_TOKENS = 12
SPLITS = [(0, 1, 3, 4), (0, 2, 4)]  # span boundaries: three spans, then two

# No special tokens: generation must not stop early, or pad, on a random model.
COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    initializer_range=0.2,  # well separated logits: greedy choices are no near-ties
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)
LLAMA_LIKE: dict[str, Any] = dict(
    COMMON,
    intermediate_size=128,
    num_hidden_layers=BLOCKS,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=False,
)
FALCON: dict[str, Any] = dict(COMMON, num_hidden_layers=BLOCKS, num_attention_heads=4)

FAMILIES: dict[str, Callable[[], PreTrainedModel]] = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**LLAMA_LIKE)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**LLAMA_LIKE)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**LLAMA_LIKE)),
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**LLAMA_LIKE, head_dim=16)),
    "mixtral": lambda: MixtralForCausalLM(
        MixtralConfig(**LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2)
    ),
    # falcon-7b: classic decoder, multi-query, parallel attention, rotary
    "falcon-7b": lambda: FalconForCausalLM(
        FalconConfig(**FALCON, new_decoder_architecture=False, multi_query=True, parallel_attn=True)
    ),
    # falcon-40b: grouped kv heads, two layer norms per block
    "falcon-40b": lambda: FalconForCausalLM(
        FalconConfig(**FALCON, new_decoder_architecture=True, num_kv_heads=2)
    ),
    # falcon-rw: ALiBi, multi-head, sequential attention then MLP, biases
    "falcon-alibi": lambda: FalconForCausalLM(
        FalconConfig(
            **FALCON,
            new_decoder_architecture=False,
            multi_query=False,
            parallel_attn=False,
            alibi=True,
            bias=True,
        )
    ),
    "bloom": lambda: BloomForCausalLM(BloomConfig(**COMMON, n_layer=BLOCKS, n_head=4)),
}
PER_SEGMENT = ["falcon-7b", "falcon-40b", "falcon-alibi", "bloom"]
# Heads per token that a block's cache update receives (and the byte budget charges for):
# the new decoder architecture broadcasts its 2 kv heads to all 4 before the update.
CACHE_HEADS = {"falcon-7b": 1, "falcon-40b": 4, "falcon-alibi": 4, "bloom": 4}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request: pytest.FixtureRequest) -> str:
    return str(request.param)


_folders: dict[str, Path] = {}


@pytest.fixture(scope="module")
def folder_of(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    def folder(name: str) -> Path:
        if name not in _folders:
            torch.manual_seed(0)
            path = tmp_path_factory.mktemp(name)
            FAMILIES[name]().eval().save_pretrained(path)
            _folders[name] = path
        return _folders[name]

    return folder


@torch.no_grad()
def decode_through_spans(head: Head, spans: list[Span], prompt: list[int]) -> list[torch.Tensor]:
    """Greedy decoding along a chain of spans with a cache each: the logits of every step."""
    kvs = [new_kv_buffers(span, span.start, span.end) for span in spans]
    step, position, logits = prompt, 0, []
    for _ in range(NEW_TOKENS):
        hidden = embed_ids(head, step)
        for span, kv in zip(spans, kvs, strict=True):
            hidden = forward_span(span, hidden, kv, position=position)
        position += len(step)
        logits.append(batch_logits(head, [hidden])[0])
        step = [int(logits[-1].argmax())]
    return logits


def test_a_chain_of_spans_decodes_what_generate_does(
    family: str, folder_of: Callable[[str], Path]
) -> None:
    folder = folder_of(family)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompt = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(1))
    out = model.generate(
        prompt,
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    expected = out.sequences[0, prompt.shape[1] :].tolist()
    head = load_head(folder)
    for bounds in SPLITS:
        spans = [load_span(folder, a, b) for a, b in pairwise(bounds)]
        logits = decode_through_spans(head, spans, prompt[0].tolist())
        assert [int(row.argmax()) for row in logits] == expected, bounds
        torch.testing.assert_close(torch.stack(logits), torch.cat(out.logits), atol=1e-4, rtol=0)


def test_a_packed_step_equals_each_session_alone(
    family: str, folder_of: Callable[[str], Path]
) -> None:
    span = load_span(folder_of(family), 1, BLOCKS)
    histories = [inputs(n, seed) for seed, n in enumerate([5, 23, 1])]
    steps = [inputs(n, 10 + seed) for seed, n in enumerate([1, 6, 1])]
    kvs = [new_kv_buffers(span, 1, BLOCKS) for _ in histories]
    for kv, history in zip(kvs, histories, strict=True):
        forward_span(span, history, kv)
    segments = [
        Segment(kv, h.shape[1], s.shape[1]) for kv, h, s in zip(kvs, histories, steps, strict=True)
    ]
    out = forward_packed(span, torch.cat(steps, 1), segments, start=1, end=BLOCKS)
    offset = 0
    for history, step in zip(histories, steps, strict=True):
        expected = reference(span, [history, step])[1]
        got = out[:, offset : offset + step.shape[1]]
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
        offset += step.shape[1]


def test_a_span_reads_only_its_own_blocks_and_sizes_its_cache(
    family: str, folder_of: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    read: list[str] = []
    real = loading.safe_open

    class Recording:
        def __init__(self, *args: Any) -> None:
            self._file = real(*args)

        def __enter__(self) -> Recording:
            self._handle = self._file.__enter__()
            return self

        def __exit__(self, *exc: object) -> None:
            self._file.__exit__(*exc)

        def keys(self) -> Any:
            return self._handle.keys()

        def get_tensor(self, name: str) -> torch.Tensor:
            read.append(name)
            return self._handle.get_tensor(name)

    monkeypatch.setattr(loading, "safe_open", Recording)
    span = load_span(folder_of(family), 1, 3)
    layers = "transformer.h." if family in PER_SEGMENT else "model.layers."
    assert read and {name[len(layers) :].split(".")[0] for name in read} == {"1", "2"}
    assert all(name.startswith(layers) for name in read)
    assert KVShape.of(span.config, span.dtype).kv_heads == CACHE_HEADS.get(family, 2)
    assert measure_decode_throughput(span) > 0  # its cache writes fit that shape


@pytest.mark.parametrize("family", ["llama", "falcon-40b", "bloom"])
def test_gradients_reach_the_input_through_a_span_without_caches(
    family: str, folder_of: Callable[[str], Path]
) -> None:
    span = load_span(folder_of(family), 0, BLOCKS)
    hidden = inputs(7, 3).requires_grad_(True)
    segments = [Segment(None, 0, 4), Segment(None, 9, 3)]  # two sequences side by side
    out = run_span(span, hidden, segments, start=0, end=BLOCKS)
    out[0, 1].sum().backward()  # the second token of the first sequence
    grad = hidden.grad
    assert grad is not None
    assert grad[0, :2].abs().sum() > 0, "it sees itself and the token before"
    assert grad[0, 2:].abs().sum() == 0, "but neither later tokens nor the other sequence"
    with torch.no_grad():  # without caches a sequence is what it is from a fresh start
        fresh = forward_span(span, hidden[:, :4].detach(), None)
    torch.testing.assert_close(out[:, :4].detach(), fresh)


def test_an_unsupported_model_type_names_the_supported_ones(tmp_path: Path) -> None:
    GPT2Config(n_layer=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"'gpt2' is not supported .*llama.*falcon.*bloom"):
        load_config(tmp_path)


def test_a_checkpoint_saved_from_the_bare_decoder_loads_too(
    folder_of: Callable[[str], Path], tmp_path: Path
) -> None:
    """BLOOM's Hub checkpoints name tensors ``h.0...``, not ``transformer.h.0...``."""
    folder = folder_of("bloom")
    for file in folder.iterdir():
        if file.name != "model.safetensors":
            shutil.copy(file, tmp_path / file.name)
    state = load_file(folder / "model.safetensors")
    save_file(
        {k.removeprefix("transformer."): v for k, v in state.items()},
        tmp_path / "model.safetensors",
    )
    ids = [5, 9, 200, 17]
    with torch.no_grad():
        expected = [
            batch_logits(head, [forward_span(span, embed_ids(head, ids), None)])
            for head, span in ((load_head(f), load_span(f, 0, BLOCKS)) for f in (folder, tmp_path))
        ]
    torch.testing.assert_close(expected[0], expected[1], atol=1e-5, rtol=1e-5)  # alignment


def test_a_span_and_head_on_another_device_keep_every_tensor_there(
    family: str, folder_of: Callable[[str], Path]
) -> None:
    """The meta device stands in for a GPU on this CPU-only machine: like CUDA, it refuses
    any op that mixes its tensors with host ones. Host hidden states in, a cached prefill
    and a packed decode of two sessions through the span and the head: every mask,
    position, rotary table, cache buffer and weight must live on the span's device."""
    if family == "mixtral":
        pytest.skip("torch's grouped matmul of MoE experts has no meta kernel for real shapes")
    meta = torch.device("meta")
    folder = folder_of(family)
    span = load_span(folder, 0, BLOCKS, torch.float32, "none", meta)
    first, second = new_kv_buffers(span, 0, BLOCKS), new_kv_buffers(span, 0, BLOCKS)
    out = run_span(span, torch.randn(1, 5, HIDDEN), [Segment(first, 0, 5)], start=0, end=BLOCKS)
    assert out.device == meta and out.shape == (1, 5, HIDDEN)
    # A continued prompt (masked), a new one (causal) and a decode step, packed.
    third = new_kv_buffers(span, 0, BLOCKS)
    run_span(span, torch.randn(1, 2, HIDDEN), [Segment(third, 0, 2)], start=0, end=BLOCKS)
    step = [Segment(first, 5, 2), Segment(second, 0, 3), Segment(third, 2, 1)]
    out = run_span(span, torch.randn(1, 6, HIDDEN), step, start=0, end=BLOCKS)
    assert out.device == meta and out.shape == (1, 6, HIDDEN)
    head = load_head(folder, meta)
    from gateway.engine.head import final_rows

    rows = final_rows(head, [torch.randn(1, 2, HIDDEN)])
    assert head.lm_head(rows).device == meta
