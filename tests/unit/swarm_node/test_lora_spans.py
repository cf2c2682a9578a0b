"""LoRA adapters on spans: a chain of spans running an adapter answers exactly as peft's
`PeftModel` on the whole model, the base model on the same spans exactly as before, and an
adapter this model cannot serve stops the node with its name."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import peft
import pytest
import torch
from peft.tuners.lora import LoraLayer
from transformers import LlamaConfig, LlamaForCausalLM

from models.adapters import (
    AdapterError,
    attach_adapters,
    read_adapter,
    read_adapters,
    select_adapter,
)
from models.loading import Head, Span, load_config, load_head, load_span
from swarm_node.backend import forward_span, new_kv_buffers
from swarm_node.batching import StepScheduler
from swarm_node.kv_buffers import KVBuffers
from tests.reference import greedy_ids
from tests.tiny_model import TINY_BLOCKS, build_lora_adapter, build_tiny_family

SPLITS = [(0, 1), (1, 3), (3, TINY_BLOCKS)]
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def spans(tiny_model: Path, tiny_adapter: Path) -> list[Span]:
    loaded = [load_span(tiny_model, start, end) for start, end in SPLITS]
    adapters = read_adapters([tiny_adapter], load_config(tiny_model))
    for span in loaded:
        attach_adapters(span, adapters)
    return loaded


@pytest.fixture(scope="module")
def head(tiny_model: Path) -> Head:
    return load_head(tiny_model)


def greedy(spans: list[Span], head: Head, adapter: str | None, prompt: list[int]) -> list[int]:
    """Greedy tokens through the chain of spans, prefill then one token per step."""
    caches = [new_kv_buffers(span, span.start, span.end) for span in spans]
    ids, position, out = list(prompt), 0, []
    with torch.inference_mode():
        for _ in range(NEW_TOKENS):
            hidden = head.embed(torch.tensor([ids[position:]]))
            for span, kv in zip(spans, caches, strict=True):
                select_adapter(span, adapter)
                hidden = forward_span(span, hidden, kv, position=position)
            position = len(ids)
            token = int(head.lm_head(head.norm(hidden[:, -1])).argmax())
            ids.append(token)
            out.append(token)
    return out


PROMPTS = [[1, 400, 401, 402, 403], list(range(200, 240))]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_an_adapter_through_split_spans_answers_as_peft_on_the_whole_model(
    spans: list[Span], head: Head, tiny_model: Path, tiny_adapter: Path, prompt: list[int]
) -> None:
    expected = greedy_ids(tiny_model, prompt, NEW_TOKENS, tiny_adapter)
    assert greedy(spans, head, "pirate", prompt) == expected
    # The adapter matters: its answer is not the base model's.
    assert expected != greedy_ids(tiny_model, prompt, NEW_TOKENS)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_the_base_model_on_spans_with_adapters_answers_as_before(
    spans: list[Span], head: Head, tiny_model: Path, prompt: list[int]
) -> None:
    assert greedy(spans, head, None, prompt) == greedy_ids(tiny_model, prompt, NEW_TOKENS)


def test_switching_adapters_does_not_walk_the_blocks(
    spans: list[Span], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every forward selects its adapter: that touches the LoRA layers found when the
    adapters were attached, never the whole module tree."""
    for span in spans:
        found = [m for layer in span.layers for m in layer.modules() if isinstance(m, LoraLayer)]
        assert found and span.lora == found

    def walked(self: torch.nn.Module) -> None:
        raise AssertionError("select_adapter walked the module tree")

    monkeypatch.setattr(torch.nn.Module, "modules", walked)
    for span in spans:
        select_adapter(span, "pirate")
        assert all(m.active_adapters == ["pirate"] and not m.disable_adapters for m in span.lora)
        select_adapter(span, None)
        assert all(m.disable_adapters for m in span.lora)


def test_forwards_of_different_adapters_never_share_a_batch(
    tiny_model: Path, tiny_adapter: Path
) -> None:
    """Steps of the base model and of an adapter that wait together run as separate
    forwards, each with its own weights."""
    span = load_span(tiny_model, 0, TINY_BLOCKS)
    attach_adapters(span, [read_adapter(tiny_adapter, load_config(tiny_model))])
    torch.manual_seed(0)
    hidden = torch.randn(1, 6, span.config.hidden_size)

    def alone(adapter: str | None) -> torch.Tensor:
        select_adapter(span, adapter)
        return forward_span(span, hidden, new_kv_buffers(span, 0, TINY_BLOCKS))

    expected = {name: alone(name) for name in (None, "pirate")}
    batches: list[int] = []

    async def together() -> dict[str | None, torch.Tensor]:
        with ThreadPoolExecutor(1) as compute:
            scheduler = StepScheduler(
                span, compute, observe_batch=lambda segments, tokens: batches.append(segments)
            )

            def step(adapter: str | None) -> asyncio.Future[torch.Tensor]:
                kv: KVBuffers = new_kv_buffers(span, 0, TINY_BLOCKS)
                return asyncio.ensure_future(
                    scheduler.step(kv, (0, TINY_BLOCKS), 0, hidden, adapter=adapter)
                )

            names: list[str | None] = [None, "pirate"]
            results = await asyncio.gather(*(step(name) for name in names))
            scheduler.close()
            return dict(zip(names, results, strict=True))

    got = asyncio.run(together())
    assert batches == [1, 1]
    for name, tensor in got.items():
        torch.testing.assert_close(tensor, expected[name], atol=0, rtol=0)


# ---- adapters a node must refuse, by name ----


def test_a_folder_that_is_not_an_adapter_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    folder = tmp_path / "empty"
    folder.mkdir()
    with pytest.raises(AdapterError, match=r"'empty'.*not a peft adapter"):
        read_adapter(folder, load_config(tiny_model))


def test_an_adapter_that_is_not_lora_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    base = LlamaForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    peft.get_peft_model(base, config).save_pretrained(tmp_path / "prompted")
    with pytest.raises(AdapterError, match=r"'prompted'.*PROMPT_TUNING.*only LoRA"):
        read_adapter(tmp_path / "prompted", load_config(tiny_model))


def test_an_adapter_of_another_base_model_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    wider = tmp_path / "wider-model"
    config = LlamaConfig.from_pretrained(tiny_model)
    config.hidden_size, config.intermediate_size = 96, 160
    LlamaForCausalLM(config).save_pretrained(wider)
    adapter = build_lora_adapter(wider, tmp_path / "elsewhere")
    span = load_span(tiny_model, 0, 2)
    with pytest.raises(AdapterError, match=r"'elsewhere'.*another base model"):
        attach_adapters(span, read_adapters([adapter], load_config(tiny_model)))


def test_an_adapter_of_a_deeper_model_is_refused(tiny_model: Path, tiny_adapter: Path) -> None:
    shallow = load_config(tiny_model)
    shallow.num_hidden_layers = 2
    with pytest.raises(AdapterError, match=r"'pirate'.*block 3 but this model has 2 blocks"):
        read_adapter(tiny_adapter, shallow)


def test_adapter_ids_must_be_usable_in_a_model_id(
    tiny_model: Path, tiny_adapter: Path, tmp_path: Path
) -> None:
    odd = tmp_path / "bad name!"
    odd.mkdir()
    for file in tiny_adapter.iterdir():
        (odd / file.name).write_bytes(file.read_bytes())
    with pytest.raises(AdapterError, match="folder name"):
        read_adapter(odd, load_config(tiny_model))
    with pytest.raises(AdapterError, match="two adapters are named 'pirate'"):
        read_adapters([tiny_adapter, tiny_adapter], load_config(tiny_model))
    assert json.loads((tiny_adapter / "adapter_config.json").read_text())["peft_type"] == "LORA"


@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_an_adapter_runs_on_a_quantized_span(
    tiny_model: Path, tiny_adapter: Path, quant: str
) -> None:
    """peft wraps bitsandbytes' layers too: on an int8 or nf4 span the adapter's effect is
    there, and the quantized output stays far closer to the fp32 adapter's than to the
    base model's."""
    adapters = read_adapters([tiny_adapter], load_config(tiny_model))
    exact = load_span(tiny_model, 0, TINY_BLOCKS)
    quantized = load_span(tiny_model, 0, TINY_BLOCKS, quant=quant)
    for span in (exact, quantized):
        attach_adapters(span, adapters)
    torch.manual_seed(0)
    hidden = torch.randn(1, 6, exact.config.hidden_size)

    def run(span: Span, adapter: str | None) -> torch.Tensor:
        select_adapter(span, adapter)
        return forward_span(span, hidden, new_kv_buffers(span, 0, TINY_BLOCKS))

    pirate, base = run(exact, "pirate"), run(exact, None)
    drift = (run(quantized, "pirate") - pirate).norm()
    assert drift < 0.5 * (pirate - base).norm()


def test_an_adapter_of_another_family_answers_as_peft(tmp_path: Path) -> None:
    """BLOOM names its blocks transformer.h.{i} and its projections otherwise: adapters
    follow the family's names."""
    model = build_tiny_family(tmp_path / "bloom", "bloom")
    adapter = build_lora_adapter(
        model, tmp_path / "bloomy", targets=["query_key_value", "dense_h_to_4h"]
    )
    config = load_config(model)
    loaded = [load_span(model, start, end) for start, end in SPLITS]
    for span in loaded:
        attach_adapters(span, read_adapters([adapter], config))
    prompt = PROMPTS[0]
    expected = greedy_ids(model, prompt, NEW_TOKENS, adapter)
    assert greedy(loaded, load_head(model), "bloomy", prompt) == expected
    assert greedy(loaded, load_head(model), None, prompt) == greedy_ids(model, prompt, NEW_TOKENS)
