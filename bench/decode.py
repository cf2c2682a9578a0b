"""Decode speed and time to first token: `transformers` generate vs the swarm, one run.

Prints JSON. The swarm is `swarmgate up` (2 nodes + gateway on loopback) driven through
the OpenAI SDK with streaming; HF runs `generate` on the same model, prompt and length
first, in a child process that exits before the swarm starts, so that neither competes with
the other for the CPU and the client measuring the swarm carries none of HF's state (its
thread pool, its freed weights). Both are greedy, so both produce the same tokens.

    python bench/decode.py [--model smollm2] [--tokens 64] [--repeats 3]
                           [--device auto|cpu|cuda|cuda:N] [--dtype auto|float32|bfloat16]

With ``--device cuda`` both run on the same GPU in the same dtype (``auto``: bf16 there),
and the JSON names the card.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import openai
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.streamers import BaseStreamer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from models.devices import Placement
from models.resolve import resolve_model
from tests.processes import Process, free_port, http_ok, wait_for

MESSAGES = [
    {"role": "user", "content": "Write a long story about a lighthouse keeper and the sea."}
]


class _Clock(BaseStreamer):
    """Records when `generate` hands over each new token (the first put() is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if self._prompt_seen:
            self.times.append(time.perf_counter())
        self._prompt_seen = True

    def end(self) -> None:
        pass


def _rates(start: float, times: list[float]) -> dict[str, float]:
    ttft = times[0] - start
    decode = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else float("nan")
    return {"ttft_s": ttft, "decode_tok_s": decode, "tokens": len(times)}


def bench_hf(path: Path, tokens: int, device: str, dtype: str) -> dict[str, float]:
    placement = Placement.of(device, dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=placement.dtype).eval()
    model.to(placement.device)
    prompt = tokenizer.apply_chat_template(
        MESSAGES, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"].to(placement.device)
    clock = _Clock()
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=4, do_sample=False)  # warm-up
        start = time.perf_counter()
        model.generate(prompt, max_new_tokens=tokens, do_sample=False, streamer=clock)
    return {**_rates(start, clock.times), "prompt_tokens": prompt.shape[1]}


def bench_hf_runs(
    path: Path, tokens: int, repeats: int, device: str, dtype: str
) -> tuple[list[dict[str, float]], int, str]:
    runs = [bench_hf(path, tokens, device, dtype) for _ in range(repeats)]
    return runs, torch.get_num_threads(), Placement.of(device, dtype).describe()


def bench_swarm(url: str, model_id: str, tokens: int) -> dict[str, float]:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    client.chat.completions.create(model=model_id, messages=MESSAGES, max_tokens=4, temperature=0)
    start = time.perf_counter()
    stream = client.chat.completions.create(
        model=model_id,
        messages=MESSAGES,
        max_tokens=tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    times: list[float] = []
    usage = None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            times.append(time.perf_counter())
        if chunk.usage is not None:
            usage = chunk.usage
    assert usage is not None
    rates = _rates(start, times)
    # Text chunks can merge tokens (multi-byte characters); rate by the tokens generated.
    rates["tokens"] = usage.completion_tokens
    rates["decode_tok_s"] = (usage.completion_tokens - 1) / (times[-1] - times[0])
    return rates


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    source = resolve_model(args.model)
    source.fetch_whole()  # a Hub model: `generate` needs all of it
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as hf_process:
        hf_runs, torch_threads, placement = hf_process.submit(
            bench_hf_runs, source.path, args.tokens, args.repeats, args.device, args.dtype
        ).result()
    port = free_port()
    log_dir = Path(__file__).resolve().parent / "results"
    log_dir.mkdir(exist_ok=True)
    swarm = Process(
        "bench-up",
        [
            *("up", "--model", args.model, "--port", str(port), "--nodes", str(args.nodes)),
            *("--device", args.device, "--dtype", args.dtype),
        ],
        log_dir,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: swarm.alive() and http_ok(f"{url}/health"), 600, "swarmgate up")
        swarm_runs = [bench_swarm(url, source.name, args.tokens) for _ in range(args.repeats)]
    finally:
        swarm.stop(timeout_s=60)

    def median(runs: list[dict[str, float]], key: str) -> float:
        return statistics.median(r[key] for r in runs)

    hf = {k: median(hf_runs, k) for k in ("ttft_s", "decode_tok_s", "tokens")}
    sw = {k: median(swarm_runs, k) for k in ("ttft_s", "decode_tok_s", "tokens")}
    print(
        json.dumps(
            {
                "date": time.strftime("%Y-%m-%d"),
                "model": source.name,
                "nodes": args.nodes,
                "device": placement,
                "prompt_tokens": hf_runs[0]["prompt_tokens"],
                "max_tokens": args.tokens,
                "repeats": args.repeats,
                "hf": hf,
                "swarm": sw,
                "decode_ratio": sw["decode_tok_s"] / hf["decode_tok_s"],
                "ttft_ratio": hf["ttft_s"] / sw["ttft_s"],
                "torch_threads": torch_threads,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
