"""Decode speed and time to first token: `transformers` generate vs the swarm, one run.

Prints JSON. The swarm is `swarmgate up` (2 nodes + gateway on loopback), streamed; HF runs
`generate` on the same model, prompt and length in a child process of its own (so that the
client measuring the swarm carries none of HF's state: its thread pool, its weights). The
two take turns, one round each, ``--repeats`` times (the order flips every round), so that
a machine whose speed drifts during the run moves both alike.

Every round asks a prompt of its own (its number comes first, in the prompt's first block of
tokens), so the swarm's TTFT prefills the whole prompt, as HF's does: ``cached_tokens`` (from
the swarm's usage) shows that none was reused. Both warm up first on another prompt. Both
are greedy, and ``greedy_equal`` checks that the swarm streamed exactly `generate`'s text
in every round.

    python bench/decode.py [--model smollm2] [--tokens 64] [--repeats 3]
                           [--device auto|cpu|cuda|cuda:N] [--dtype auto|float32|bfloat16]
                           [--url URL] [--record]

With ``--device cuda`` both run on the same GPU in the same dtype (``auto``: bf16 there),
and the JSON names the card.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import (
    add_record_flag,
    finish,
    greedy_check,
    running_swarm,
    served_model,
    stream_chat,
)
from models.resolve import resolve_model

WARM_UP = [{"role": "user", "content": "Say hello."}]


def messages(round_: int) -> list[dict[str, Any]]:
    """Round ``round_``'s prompt: cold for the swarm's caches (its number comes first)."""
    return [
        {
            "role": "user",
            "content": f"Story {round_}: write a long story about a lighthouse keeper and the sea.",
        }
    ]


# --- transformers, in its own process -----------------------------------------------------

_HF: dict[str, Any] = {}  # the child's model, tokenizer and placement


def hf_load(path: Path, device: str, dtype: str) -> tuple[int, str]:
    """Loads the model into the child and warms it up; the child's torch threads and where
    the model runs."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from models.devices import Placement

    placement = Placement.of(device, dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=placement.dtype).eval()
    _HF.update(
        model=model.to(placement.device),
        tokenizer=AutoTokenizer.from_pretrained(path),
        device=placement.device,
    )
    hf_round(WARM_UP, 4)
    return torch.get_num_threads(), placement.describe()


def hf_round(chat: list[dict[str, Any]], tokens: int) -> dict[str, Any]:
    """One timed greedy ``generate``: TTFT, decode rate and the text."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):  # type: ignore[misc]
        """When `generate` hands over each new token (its first put() is the prompt)."""

        def __init__(self) -> None:
            self.times: list[float] = []
            self.prompt_seen = False

        def put(self, value: torch.Tensor) -> None:
            if self.prompt_seen:
                self.times.append(time.perf_counter())
            self.prompt_seen = True

        def end(self) -> None:
            pass

    tokenizer = _HF["tokenizer"]
    prompt = tokenizer.apply_chat_template(
        chat, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"].to(_HF["device"])
    clock = Clock()
    with torch.no_grad():
        start = time.perf_counter()
        out = _HF["model"].generate(prompt, max_new_tokens=tokens, do_sample=False, streamer=clock)
    times = clock.times
    return {
        "ttft_s": times[0] - start,
        "decode_tok_s": (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else None,
        "tokens": len(times),
        "prompt_tokens": prompt.shape[1],
        "text": tokenizer.decode(out[0, prompt.shape[1] :], skip_special_tokens=True),
    }


# --- the swarm ----------------------------------------------------------------------------


def swarm_round(url: str, model: str, chat: list[dict[str, Any]], tokens: int) -> dict[str, Any]:
    streamed = stream_chat(url, model, chat, tokens)
    return {
        "ttft_s": streamed.ttft_s,
        "decode_tok_s": streamed.decode_tok_s if streamed.tokens > 1 else None,
        "tokens": streamed.tokens,
        "prompt_tokens": streamed.prompt_tokens,
        "cached_tokens": streamed.cached_tokens,
        "text": streamed.text,
    }


def median(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r[key] is not None]
    return statistics.median(values) if values else None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument(
        "--url", help="measure the gateway at URL (its swarm as it runs) instead of starting one"
    )
    add_record_flag(parser)
    args = parser.parse_args(argv)
    source = resolve_model(args.model)
    source.fetch_whole()  # a Hub model: `generate` needs all of it
    flags = ["--device", args.device, "--dtype", args.dtype]
    spawn = multiprocessing.get_context("spawn")
    with (
        running_swarm(args.url, args.model, args.nodes, "bench-decode-up", flags) as url,
        ProcessPoolExecutor(max_workers=1, mp_context=spawn) as hf,
    ):
        model_id = served_model(url)
        threads, placement = hf.submit(hf_load, source.path, args.device, args.dtype).result()
        stream_chat(url, model_id, WARM_UP, 4)
        hf_runs, swarm_runs = [], []
        for r in range(args.repeats):
            chat = messages(r)
            # Flip the order every round, so neither side always runs first.
            for side in ("hf", "swarm") if r % 2 == 0 else ("swarm", "hf"):
                if side == "hf":
                    hf_runs.append(hf.submit(hf_round, chat, args.tokens).result())
                else:
                    swarm_runs.append(swarm_round(url, model_id, chat, args.tokens))

    keys = ("ttft_s", "decode_tok_s", "tokens")
    hf_out = {k: median(hf_runs, k) for k in keys}
    sw_out = {k: median(swarm_runs, k) for k in keys}
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "model": model_id,
        "nodes": args.nodes,
        "device": placement,
        "prompt_tokens": hf_runs[0]["prompt_tokens"],
        "swarm_prompt_tokens": swarm_runs[0]["prompt_tokens"],
        "swarm_cached_tokens": [r["cached_tokens"] for r in swarm_runs],
        "max_tokens": args.tokens,
        "repeats": args.repeats,
        "hf": hf_out,
        "swarm": sw_out,
        "decode_ratio": (
            sw_out["decode_tok_s"] / hf_out["decode_tok_s"]
            if sw_out["decode_tok_s"] and hf_out["decode_tok_s"]
            else None
        ),
        "ttft_ratio": hf_out["ttft_s"] / sw_out["ttft_s"] if sw_out["ttft_s"] else None,
        "rounds": {
            "hf": [{k: r[k] for k in keys} for r in hf_runs],
            "swarm": [{k: r[k] for k in keys} for r in swarm_runs],
        },
        **greedy_check([r["text"] for r in swarm_runs], [r["text"] for r in hf_runs]),
        "torch_threads": threads,
    }
    finish("decode", result, args)
    return result


if __name__ == "__main__":
    main()
