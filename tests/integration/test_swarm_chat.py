"""Chat completions through a real two-node swarm equal `transformers` `generate`."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import httpx
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessorList

from tests.integration.conftest import PREFILL_CHUNK_TOKENS, Swarm, running_gateway
from tests.processes import wait_for

pytestmark = pytest.mark.integration

PROMPTS = [
    [{"role": "user", "content": "Name three planets."}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi!"}],
    [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": [{"type": "text", "text": "And 3+3?"}]},
    ],
    # Far longer than one prefill message.
    [{"role": "user", "content": " ".join(f"Item {i} is a word about rivers." for i in range(40))}],
]


@cache
def _reference(model_path: Path) -> tuple[AutoModelForCausalLM, AutoTokenizer]:
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(model_path)


def hf_greedy(
    model_path: Path,
    messages: list[dict],
    max_new_tokens: int,
    logits_processor: LogitsProcessorList | None = None,
) -> tuple[list[int], list[int]]:
    """Prompt ids and the greedy continuation from `generate` on the whole model (after
    ``logits_processor``, where given)."""
    model, tokenizer = _reference(model_path)
    flat = [
        {
            "role": m["role"],
            "content": m["content"]
            if isinstance(m["content"], str)
            else "".join(p["text"] for p in m["content"]),
        }
        for m in messages
    ]
    text = tokenizer.apply_chat_template(flat, add_generation_prompt=True, tokenize=False)
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            logits_processor=logits_processor,
        )
    generated = out[0, len(prompt) :].tolist()
    if generated and generated[-1] == tokenizer.eos_token_id:
        generated = generated[:-1]
    return prompt, generated


def client(swarm: Swarm) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{swarm.base_url}/v1", api_key="unused", max_retries=0)


@pytest.mark.parametrize("messages", PROMPTS, ids=["planets", "system", "multi-turn", "long"])
def test_greedy_output_equals_transformers_generate(swarm: Swarm, messages: list[dict]) -> None:
    prompt, expected = hf_greedy(swarm.model_path, messages, max_new_tokens=24)
    tokenizer = _reference(swarm.model_path)[1]

    response = client(swarm).chat.completions.create(
        model=swarm.model_id, messages=messages, max_tokens=24, temperature=0
    )

    assert response.usage.prompt_tokens == len(prompt)
    assert response.usage.completion_tokens == len(expected)
    assert response.choices[0].message.content == tokenizer.decode(
        expected, skip_special_tokens=True
    )
    assert response.choices[0].finish_reason == ("length" if len(expected) == 24 else "stop")


@pytest.mark.parametrize("screen", ["on", "off"])
def test_greedy_output_is_exact_with_the_greedy_screen_on_and_off(
    swarm: Swarm, tmp_path: Path, screen: str
) -> None:
    """`--greedy-screen on` finds each greedy token without the full LM head wherever its
    bound holds, `off` never: both answer exactly as ``generate``."""
    tokenizer = _reference(swarm.model_path)[1]
    flags = ("--greedy-screen", screen, "--prefill-chunk-tokens", str(PREFILL_CHUNK_TOKENS))
    with running_gateway(swarm, tmp_path, *flags, name=f"gateway screen {screen}") as url:
        sdk = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        for messages in PROMPTS:
            _, expected = hf_greedy(swarm.model_path, messages, max_new_tokens=24)
            response = sdk.chat.completions.create(
                model=swarm.model_id, messages=messages, max_tokens=24, temperature=0
            )
            assert response.choices[0].message.content == tokenizer.decode(
                expected, skip_special_tokens=True
            )


def test_concurrent_streams_each_equal_transformers_generate(swarm: Swarm) -> None:
    """Nodes batch the steps of streams that arrive together (mixed history lengths, one
    prompt still in prefill while others decode): each still gets exactly its own output."""
    expected = [hf_greedy(swarm.model_path, m, max_new_tokens=24)[1] for m in PROMPTS]
    tokenizer = _reference(swarm.model_path)[1]

    def chat(index: int) -> str | None:
        with openai.OpenAI(
            base_url=f"{swarm.base_url}/v1", api_key=f"user-{index}", max_retries=0
        ) as own:  # one key each: the gateway limits concurrent requests per key
            response = own.chat.completions.create(
                model=swarm.model_id, messages=PROMPTS[index], max_tokens=24, temperature=0
            )
        return response.choices[0].message.content

    batched_before = [multi_session_batches(url) for url in swarm.node_metrics]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        answers = list(pool.map(chat, range(len(PROMPTS))))
    assert answers == [tokenizer.decode(e, skip_special_tokens=True) for e in expected]

    # And they did run together: some node ran a forward of more than one session.
    def batched() -> bool:
        now = [multi_session_batches(url) for url in swarm.node_metrics]
        return any(a > b for a, b in zip(now, batched_before, strict=True))

    wait_for(batched, 10, "a node's metrics to show a batch of more than one session")


def multi_session_batches(node_metrics_url: str) -> float:
    """How many forwards a node ran with more than one session, from its /metrics (a
    snapshot the node publishes every second)."""
    text = httpx.get(node_metrics_url, timeout=5).text
    count = re.search(r"^swarmgate_node_batch_sessions_count (\S+)$", text, re.M)
    single = re.search(r'^swarmgate_node_batch_sessions_bucket\{le="1.0"\} (\S+)$', text, re.M)
    assert count and single, "the node publishes its batch sizes"
    return float(count[1]) - float(single[1])


def test_long_prompt_spans_several_prefill_messages(swarm: Swarm) -> None:
    prompt, _ = hf_greedy(swarm.model_path, PROMPTS[-1], max_new_tokens=1)
    assert len(prompt) > 4 * PREFILL_CHUNK_TOKENS


def test_sdk_stream_matches_non_stream(swarm: Swarm) -> None:
    messages = PROMPTS[0]
    whole = client(swarm).chat.completions.create(
        model=swarm.model_id, messages=messages, max_tokens=20, temperature=0
    )
    chunks = list(
        client(swarm).chat.completions.create(
            model=swarm.model_id,
            messages=messages,
            max_tokens=20,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )

    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_raw_sse_frames_end_with_done(swarm: Swarm) -> None:
    body = {"model": swarm.model_id, "messages": PROMPTS[0], "max_tokens": 8, "stream": True}
    with httpx.stream("POST", f"{swarm.base_url}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = "".join(r.iter_text())
    servers = httpx.get(f"{swarm.base_url}/swarm").json()["servers"]
    peer = {(s["start"], s["end"]): s["peer_id"] for s in servers}
    assert r.headers["x-swarmgate-route"] == f"{peer[0, 2]}:0-2,{peer[2, 4]}:2-4"
    events = [e for e in raw.split("\n\n") if e and not e.startswith(":")]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: ") :]) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_seeded_sampling_is_reproducible(swarm: Swarm) -> None:
    def sample(seed: int) -> str:
        r = client(swarm).chat.completions.create(
            model=swarm.model_id, messages=PROMPTS[1], max_tokens=16, temperature=1.0, seed=seed
        )
        return r.choices[0].message.content or ""

    assert sample(7) == sample(7)
    assert len({sample(s) for s in range(4)}) > 1


def test_stop_sequence_cuts_output(swarm: Swarm) -> None:
    full = (
        client(swarm)
        .chat.completions.create(
            model=swarm.model_id, messages=PROMPTS[0], max_tokens=24, temperature=0
        )
        .choices[0]
        .message.content
    )
    assert full and len(full) > 6
    stop = full[3:6]
    cut = client(swarm).chat.completions.create(
        model=swarm.model_id, messages=PROMPTS[0], max_tokens=24, temperature=0, stop=[stop]
    )
    assert cut.choices[0].message.content == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{not json", 400, None),
        (
            json.dumps({"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}),
            404,
            "model_not_found",
        ),
        (json.dumps({"model": "tiny-llama", "messages": []}), 400, None),
        (
            json.dumps(
                {
                    "model": "tiny-llama",
                    "temperature": 5,
                    "messages": [{"role": "user", "content": "x"}],
                }
            ),
            400,
            None,
        ),
        (
            json.dumps(
                {
                    "model": "tiny-llama",
                    "max_tokens": 100000,
                    "messages": [{"role": "user", "content": "x"}],
                }
            ),
            400,
            "context_length_exceeded",
        ),
    ],
    ids=["bad-json", "unknown-model", "no-messages", "bad-temperature", "too-long"],
)
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(
    swarm: Swarm, body: bytes | str, status: int, code: str | None
) -> None:
    r = httpx.post(
        f"{swarm.base_url}/v1/chat/completions",
        content=body,
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    assert r.status_code == status
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["code"] == code

    ok = client(swarm).chat.completions.create(
        model=swarm.model_id, messages=PROMPTS[0], max_tokens=2, temperature=0
    )
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_sdk_raises_not_found_for_unknown_model(swarm: Swarm) -> None:
    with pytest.raises(openai.NotFoundError):
        client(swarm).chat.completions.create(model="nope", messages=PROMPTS[0])


def test_health_models_and_swarm_describe_the_chain(swarm: Swarm) -> None:
    health = httpx.get(f"{swarm.base_url}/health").json()
    assert health["status"] == "ok"
    assert [(h["start"], h["end"]) for h in health["route"]] == [(0, 2), (2, 4)]

    models = client(swarm).models.list()
    assert [m.id for m in models] == [swarm.model_id]

    coverage = httpx.get(f"{swarm.base_url}/swarm").json()
    assert coverage["model"] == swarm.model_id and coverage["num_blocks"] == 4
    spans = sorted((s["start"], s["end"], s["state"]) for s in coverage["servers"])
    assert spans == [(0, 2, "online"), (2, 4, "online")]


def test_status_command_prints_the_coverage_table(swarm: Swarm) -> None:
    import subprocess
    import sys

    from tests.processes import REPO

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "swarmgate",
            "status",
            "--json",
            "--initial-peers",
            *swarm.initial_peers,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        check=True,
    )
    [report] = json.loads(result.stdout)
    assert report["model"] == swarm.model_id and report["health"].startswith("ok")
    assert sorted((s["start"], s["end"]) for s in report["servers"]) == [(0, 2), (2, 4)]


def test_client_disconnect_closes_the_streams_on_every_node(swarm: Swarm) -> None:
    def open_streams() -> list[float]:
        servers = httpx.get(f"{swarm.base_url}/swarm").json()["servers"]
        return [server["load"] for server in servers]

    body = {"model": swarm.model_id, "messages": PROMPTS[0], "max_tokens": 900, "stream": True}
    with httpx.stream("POST", f"{swarm.base_url}/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        # Nodes announce every 2 s and the gateway re-reads every 2 s: the session shows up.
        wait_for(lambda: open_streams() == [1, 1], 30, "the streams to be announced")
    wait_for(lambda: open_streams() == [0, 0], 30, "the nodes to close the streams")


@pytest.mark.parametrize("prompt", ["Once upon a time", "The capital of France is " * 12])
def test_text_completion_equals_transformers_generate(swarm: Swarm, prompt: str) -> None:
    model, tokenizer = _reference(swarm.model_path)
    ids = tokenizer(prompt)["input_ids"]
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)
    expected = tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)

    sdk = client(swarm)
    whole = sdk.completions.create(
        model=swarm.model_id, prompt=prompt, max_tokens=12, temperature=0
    )
    assert whole.choices[0].text == expected
    assert whole.usage.prompt_tokens == len(ids)
    streamed = sdk.completions.create(
        model=swarm.model_id, prompt=prompt, max_tokens=12, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == expected


def test_streamed_text_never_splits_a_multibyte_character(swarm: Swarm) -> None:
    sdk = client(swarm)
    messages = [{"role": "user", "content": "Écris quelque chose: é, ü, 中文, 🙂."}]
    # The random tiny model samples freely from a byte-level vocabulary: find a seed whose
    # answer holds characters of several bytes (bounded search).
    for seed in range(30):
        whole = sdk.chat.completions.create(
            model=swarm.model_id, messages=messages, max_tokens=40, temperature=1.0, seed=seed
        )
        text = whole.choices[0].message.content or ""
        if any(len(ch.encode()) > 1 for ch in text) and "\ufffd" not in text:
            break
    else:
        pytest.fail("no seed produced multi-byte text")
    stream = sdk.chat.completions.create(
        model=swarm.model_id,
        messages=messages,
        max_tokens=40,
        temperature=1.0,
        seed=seed,
        stream=True,
    )
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
