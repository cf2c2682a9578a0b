"""What the benches share: streaming a chat and timing its chunks, the greedy reference they
compare the swarm's tokens with, and recording a run as one JSON line.

Every bench prints its JSON; with ``--record`` it also appends one line to
``bench/results/<bench>.jsonl``: the result with the date, the git commit, the machine and
the exact command, so that each figure the README quotes (rendered by ``bench/report.py``)
can be traced to the run that measured it.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
LOGS = REPO / "bench" / "logs"  # the swarm processes' logs (ignored by git)


def log_dir() -> Path:
    LOGS.mkdir(parents=True, exist_ok=True)
    return LOGS


# --- one streamed chat request ------------------------------------------------------------


@dataclass
class Streamed:
    """One streamed chat completion as the client saw it. Times are ``perf_counter``."""

    started: float = 0.0
    times: list[float] = field(default_factory=list)  # each chunk carrying text
    text: str = ""
    route: str = ""  # the gateway's X-Swarmgate-Route header
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None  # from the usage chunk
    cached_tokens: int | None = None
    ended: float | None = None
    error: str | None = None

    @property
    def tokens(self) -> int:
        """Tokens generated: from usage, else the text chunks (a chunk can hold several
        tokens, multi-byte characters: a lower bound)."""
        return self.completion_tokens if self.completion_tokens is not None else len(self.times)

    @property
    def ttft_s(self) -> float | None:
        return self.times[0] - self.started if self.times else None

    @property
    def decode_s(self) -> float:
        return self.times[-1] - self.times[0] if len(self.times) > 1 else float("nan")

    @property
    def decode_tok_s(self) -> float:
        """(tokens - 1) / (first text to last text): the rate after the first token."""
        return (self.tokens - 1) / self.decode_s if len(self.times) > 1 else float("nan")

    @property
    def hops(self) -> int | None:
        return len(self.route.split(",")) if self.route else None

    def longest_gap_from(self, since: float) -> float | None:
        """The longest wait for text from ``since`` on: from ``since`` to the first chunk
        after it, or between two later chunks, whichever is longest."""
        after = [t for t in self.times if t > since]
        if not after:
            return None
        edges = [since, *after]
        return max(b - a for a, b in itertools.pairwise(edges))


def chat_body(model: str, messages: list[dict[str, Any]], max_tokens: int) -> dict[str, Any]:
    """A greedy, streamed request that ends with a usage chunk."""
    return {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def _take(line: str, out: Streamed) -> bool:
    """Fold one SSE line into ``out``; True when it carried text."""
    if not line.startswith("data: ") or line == "data: [DONE]":
        return False
    chunk = json.loads(line.removeprefix("data: "))
    if "error" in chunk:
        raise RuntimeError(f"the stream failed: {chunk['error']}")
    usage = chunk.get("usage")
    if usage:
        out.prompt_tokens = usage.get("prompt_tokens")
        out.completion_tokens = usage.get("completion_tokens")
        out.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
    if not chunk.get("choices"):
        return False
    choice = chunk["choices"][0]
    out.finish_reason = choice.get("finish_reason") or out.finish_reason
    text = (choice.get("delta") or {}).get("content")
    if not text:
        return False
    out.times.append(time.perf_counter())
    out.text += text
    return True


def stream_chat(
    url: str,
    model: str,
    messages: list[dict[str, Any]],
    max_tokens: int,
    *,
    api_key: str = "bench",
    on_text: Callable[[Streamed], None] | None = None,
    timeout_s: float = 600.0,
) -> Streamed:
    """One greedy streamed chat request to the gateway at ``url``; ``on_text(streamed)`` is
    called after each chunk that carried text (the failover bench strikes from there)."""
    out = Streamed(started=time.perf_counter())
    headers = {"Authorization": f"Bearer {api_key}"}
    body = chat_body(model, messages, max_tokens)
    with httpx.stream(
        "POST", f"{url}/v1/chat/completions", json=body, headers=headers, timeout=timeout_s
    ) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.read()[:500]!r}")
        out.route = response.headers.get("x-swarmgate-route", "")
        for line in response.iter_lines():
            if _take(line, out) and on_text is not None:
                on_text(out)
    out.ended = time.perf_counter()
    return out


async def astream_chat(
    client: httpx.AsyncClient,
    model: str,
    messages: list[dict[str, Any]],
    max_tokens: int,
    out: Streamed,
    *,
    api_key: str = "bench",
) -> None:
    """``stream_chat`` on an event loop. It fills ``out`` as it goes, so a stream cancelled
    by a deadline still shows what it got; an error is kept in ``out.error``, not raised."""
    out.started = time.perf_counter()
    headers = {"Authorization": f"Bearer {api_key}"}
    body = chat_body(model, messages, max_tokens)
    try:
        async with client.stream(
            "POST", "/v1/chat/completions", json=body, headers=headers
        ) as response:
            if response.status_code != 200:
                raise RuntimeError(
                    f"HTTP {response.status_code}: {(await response.aread())[:300]!r}"
                )
            out.route = response.headers.get("x-swarmgate-route", "")
            async for line in response.aiter_lines():
                _take(line, out)
    except Exception as e:  # a failed stream is a result, not the end of the benchmark
        out.error = f"{type(e).__name__}: {e}"[:300]
    finally:
        out.ended = time.perf_counter()


def complete(url: str, model: str, messages: list[dict[str, Any]], max_tokens: int) -> dict:
    """One greedy request, not streamed: the response's JSON."""
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    headers = {"Authorization": "Bearer bench"}
    response = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=600)
    response.raise_for_status()
    reply: dict = response.json()
    return reply


# --- the greedy reference -----------------------------------------------------------------


def greedy_texts(
    path: Path,
    conversations: list[list[dict[str, Any]]],
    max_tokens: int | list[int],
    device: str = "auto",
    dtype: str = "auto",
) -> list[str]:
    """What `transformers` ``generate`` answers greedily to each conversation (chat template,
    at most ``max_tokens`` new tokens, one for all or one each, special tokens left out of
    the text), run in a child process that exits before this returns: the swarm must stream
    exactly this text, and the measuring process keeps none of the whole model's state."""
    with greedy_reference(path, conversations, max_tokens, device, dtype) as texts:
        return texts()


@contextlib.contextmanager
def greedy_reference(
    path: Path,
    conversations: list[list[dict[str, Any]]],
    max_tokens: int | list[int],
    device: str = "auto",
    dtype: str = "auto",
) -> Iterator[Callable[[], list[str]]]:
    """``greedy_texts`` computed in a child while the block goes on (a swarm starting, say);
    the function yielded waits for the texts, and the child exits once they are in."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    if isinstance(max_tokens, int):
        max_tokens = [max_tokens] * len(conversations)
    spawn = multiprocessing.get_context("spawn")
    child = ProcessPoolExecutor(max_workers=1, mp_context=spawn)
    future = child.submit(_greedy_texts, path, conversations, max_tokens, device, dtype)

    def texts() -> list[str]:
        done: list[str] = future.result()
        child.shutdown()
        return done

    try:
        yield texts
    finally:
        child.shutdown(cancel_futures=True)


def _greedy_texts(
    path: Path,
    conversations: list[list[dict[str, Any]]],
    max_tokens: list[int],
    device: str,
    dtype: str,
) -> list[str]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(REPO))
    from models.devices import Placement

    placement = Placement.of(device, dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=placement.dtype).eval()
    model.to(placement.device)
    texts = []
    for messages, tokens in zip(conversations, max_tokens, strict=True):
        prompt = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"].to(placement.device)
        with torch.no_grad():
            out = model.generate(prompt, max_new_tokens=tokens, do_sample=False)
        texts.append(tokenizer.decode(out[0, prompt.shape[1] :], skip_special_tokens=True))
    return texts


def greedy_check(got: list[str], want: list[str]) -> dict[str, Any]:
    """``greedy_equal``: every swarm answer is ``generate``'s; the first that is not, if any."""
    pairs = list(zip(got, want, strict=True))
    unequal = [{"swarm": g, "generate": w} for g, w in pairs if g != w]
    return {
        "greedy_equal": not unequal,
        "greedy_unequal": len(unequal),
        "first_unequal": (unequal or [None])[0],
    }


# --- recording a run ----------------------------------------------------------------------


def add_record_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--record",
        action="store_true",
        help="also append this run (JSON, with date, commit, machine and command) to "
        "bench/results/<bench>.jsonl",
    )


def _git(*args: str) -> str:
    try:
        done = subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip()


def machine() -> dict[str, Any]:
    """What ran it: CPU, cores, GPU if any, and how loaded the machine was at the end."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    about: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
    }
    if "torch" in sys.modules:  # no bench pays torch's import for this alone
        torch = sys.modules["torch"]
        about["torch"] = torch.__version__
        about["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            about["gpu"] = torch.cuda.get_device_name(0)
    if hasattr(os, "getloadavg"):
        about["load_1m"] = round(os.getloadavg()[0], 2)
    return about


def run_record(bench: str, result: dict[str, Any]) -> dict[str, Any]:
    """The JSON line of this run of ``bench``."""
    return {
        "bench": bench,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "commit": _git("rev-parse", "HEAD"),
        "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "machine": machine(),
        "command": shlex.join(["python", f"bench/{bench}.py", *sys.argv[1:]]),
        "result": result,
    }


def finish(bench: str, result: dict[str, Any], args: argparse.Namespace) -> None:
    """Print the run's JSON and, with ``--record``, append its line to the bench's file."""
    print(json.dumps(result, indent=2))
    if getattr(args, "record", False):
        RESULTS.mkdir(parents=True, exist_ok=True)
        with open(RESULTS / f"{bench}.jsonl", "a") as out:
            out.write(json.dumps(run_record(bench, result)) + "\n")


# --- the swarm under test -----------------------------------------------------------------


@contextlib.contextmanager
def running_swarm(
    url: str | None,
    model: str,
    nodes: int,
    name: str,
    flags: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[str]:
    """The gateway URL to measure: ``url`` as given (a swarm someone else runs, as the smoke
    test's), else a `swarmgate up` of ``model`` on ``nodes`` nodes, stopped on exit."""
    if url is not None:
        yield url
        return
    from tests.processes import start_up

    swarm, started = start_up(model, nodes, log_dir(), name, env, flags=flags or ())
    try:
        yield started
    finally:
        swarm.stop(timeout_s=60)


def served_model(url: str) -> str:
    """The model id the gateway at ``url`` serves (the first it lists)."""
    listed = httpx.get(f"{url}/v1/models", timeout=30).json()["data"]
    model: str = listed[0]["id"]
    return model
