"""What the gateway's LM head costs per token for a real vocabulary: a Llama-3-70B-shaped
head (128,256 x 8,192, random weights, final norm included) at batch 1 and 16, in fp32 and
bf16, on one device, beside SmolLM2's (49,152 x 576) for scale.

Prints JSON: per head, dtype and batch, the median seconds of one call (norm + matmul + the
logits' copy to the host, as the gateway runs it) and per row, and the weight bytes read
per second. With ``--screen``, fp32 greedy rows also go through the bf16 screen the gateway
uses on CPUs (gateway/engine/greedy_head.py).

    python bench/head.py [--device cpu|cuda] [--repeats 5] [--screen] [--record]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import add_record_flag, finish
from gateway.engine.greedy_head import GreedyScreen
from models.devices import Placement, describe_device, synchronize, to_host

HEADS = {"llama-3-70b": (128_256, 8_192), "smollm2": (49_152, 576)}
BATCHES = (1, 16)


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    fn()  # warm-up: first-touch of the weights, kernel selection
    times = []
    for _ in range(repeats):
        synchronize(device)
        began = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def random_head(
    vocab: int, hidden: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.nn.Module, torch.nn.Linear]:
    """A final norm and an LM head with random weights, built in place (no fp32 copy of a
    bf16 head): what `load_head` gives for a model of this shape."""
    norm = torch.nn.RMSNorm(hidden, device=device, dtype=dtype)
    head = torch.nn.Linear(hidden, vocab, bias=False, device=device, dtype=dtype)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        head.weight.normal_(0, 0.02, generator=generator)
    return norm.eval(), head.eval()


@torch.inference_mode()
def bench_head(
    name: str, device: torch.device, dtype: torch.dtype, repeats: int, screen: bool
) -> list[dict[str, Any]]:
    vocab, hidden = HEADS[name]
    norm, head = random_head(vocab, hidden, dtype, device)
    weight_bytes = head.weight.numel() * head.weight.element_size()
    checker = GreedyScreen.of(head) if screen else None
    rows: list[dict[str, Any]] = []
    for batch in BATCHES:
        x = torch.randn(batch, hidden, device=device, dtype=dtype)

        def call(x: torch.Tensor = x) -> torch.Tensor:
            return to_host(head(norm(x)).float())

        seconds = timed(call, device, repeats)
        row: dict[str, Any] = {
            "head": name,
            "shape": [vocab, hidden],
            "dtype": str(dtype).removeprefix("torch."),
            "batch": batch,
            "call_s": seconds,
            "per_row_s": seconds / batch,
            "weight_gb": weight_bytes / 1e9,
            "gb_per_s": weight_bytes / seconds / 1e9,
        }
        if checker is not None:
            normed = norm(x)
            row["screen_call_s"] = timed(lambda n=normed: checker.argmax(n), device, repeats)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--screen", action="store_true", help="time the fp32 greedy screen too")
    parser.add_argument("--heads", nargs="+", default=list(HEADS), choices=list(HEADS))
    add_record_flag(parser)
    args = parser.parse_args(argv)
    device = Placement.of(args.device, "float32").device
    results = []
    for name in args.heads:
        for dtype in (torch.float32, torch.bfloat16):
            screen = args.screen and dtype == torch.float32 and device.type == "cpu"
            results += bench_head(name, device, dtype, args.repeats, screen)
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "device": describe_device(device),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "results": results,
    }
    finish("head", result, args)
    return result


if __name__ == "__main__":
    main()
