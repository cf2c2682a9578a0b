"""`swarmgate up` on the embedded model, used the way a person would: SDK and curl -N."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
from collections.abc import Iterator

import openai
import psutil
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from models.resolve import resolve_model
from tests.processes import Process, free_port, http_ok, no_orphans, wait_for
from tests.reference import greedy_ids, token_texts
from tests.reference import tokenizer as reference_tokenizer

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "Name three planets."}]


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Process]]:
    port = free_port()
    with no_orphans():
        process = Process("up", ["up", "--port", str(port)], tmp_path_factory.mktemp("up"))
        try:

            def ready() -> bool:
                assert process.alive(), f"swarmgate up exited:\n{process.output()[-3000:]}"
                return "swarmgate is ready" in process.output() and http_ok(
                    f"http://127.0.0.1:{port}/health"
                )

            wait_for(ready, 600, "swarmgate up to report ready", poll_s=0.5)
            yield f"http://127.0.0.1:{port}", process
        finally:
            children = process.descendants()
            process.stop(timeout_s=60)
            wait_for(
                lambda: (
                    not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children)
                ),
                30,
                "every child of `up` to exit",
            )


def test_sdk_stream_is_token_exact_with_transformers(up: tuple[str, Process]) -> None:
    url, _ = up
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    [model_id] = [m.id for m in client.models.list()]
    stream = client.chat.completions.create(
        model=model_id, messages=QUESTION, max_tokens=20, temperature=0, stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    path = resolve_model("smollm2").path
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompt = tokenizer.apply_chat_template(
        QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=20, do_sample=False)
    expected = tokenizer.decode(out[0, prompt.shape[1] :], skip_special_tokens=True)
    assert text == expected and text.strip()


NO_EOS = {"0": -100, "2": -100}  # <|endoftext|>, <|im_end|>: all LONG_TOKENS are compared
LONG_TOKENS = 256


def test_the_embedded_models_256_greedy_tokens_are_generates_own(up: tuple[str, Process]) -> None:
    """A trained model's logits are close where the tiny random models' are not: 256 greedy
    tokens through the swarm's chain are, position by position, the ids ``generate`` picks
    on the whole model. The API returns no ids, so each position's token text (logprobs)
    is compared with the text of the expected id at that position."""
    url, _ = up
    path = resolve_model("smollm2").path
    prompt = reference_tokenizer(path)("The history of the river began", add_special_tokens=False)[
        "input_ids"
    ]
    expected = greedy_ids(path, prompt, LONG_TOKENS, logit_bias=NO_EOS)
    assert len(expected) == LONG_TOKENS
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    [model_id] = [m.id for m in client.models.list()]
    answer = client.completions.create(
        model=model_id,
        prompt=prompt,
        max_tokens=LONG_TOKENS,
        temperature=0,
        logprobs=0,
        logit_bias=NO_EOS,
    )
    tokens = answer.choices[0].logprobs.tokens
    assert answer.usage.completion_tokens == LONG_TOKENS
    assert tokens == token_texts(path, expected)


def test_up_runs_a_closed_swarm_with_a_key_only_its_user_can_read(
    up: tuple[str, Process],
) -> None:
    _, process = up
    match = re.search(r"only processes given its key \((\S+)\) join it", process.output())
    assert match, process.output()[-2000:]
    assert stat.S_IMODE(os.stat(match[1]).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(match[1])).st_mode) == 0o700
    assert "closed swarm SHA256:" in process.output()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_streams_until_done(up: tuple[str, Process]) -> None:
    url, _ = up
    body = {"model": "smollm2", "stream": True, "max_tokens": 12, "messages": QUESTION}
    result = subprocess.run(
        [
            "curl",
            "-sN",
            f"{url}/v1/chat/completions",
            "-H",
            "Content-Type: application/json",
            "-d",
            json.dumps(body),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    events = [e for e in result.stdout.split("\n\n") if e.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)


def test_sigterm_stops_every_child(up: tuple[str, Process]) -> None:
    _, process = up
    children = process.descendants()
    assert len([c for c in children if "swarmgate" in " ".join(c.cmdline())]) >= 3
    assert process.stop(timeout_s=60) == 0
    wait_for(
        lambda: not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children),
        30,
        "every child of `up` to exit",
    )


def test_ctrl_c_stops_the_whole_swarm(tmp_path, tiny_model) -> None:
    """Ctrl-C in a terminal sends SIGINT to the whole foreground process group. What the
    swarm serves does not matter here: the tiny model starts in a fraction of the time."""
    port = free_port()
    with no_orphans():
        argv = ["up", "--port", str(port), "--model", str(tiny_model)]
        process = Process("up-ctrl-c", argv, tmp_path)
        try:
            wait_for(
                lambda: "swarmgate is ready" in process.output() or not process.alive(),
                600,
                "swarmgate up to report ready",
                poll_s=0.5,
            )
            assert process.alive(), process.output()[-3000:]
            children = process.descendants()
            os.killpg(process.popen.pid, signal.SIGINT)
            assert process.popen.wait(60) == 0, process.output()[-3000:]
            wait_for(
                lambda: (
                    not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children)
                ),
                30,
                "every child of `up` to exit",
            )
        finally:
            process.stop()
