"""What each precision of a span costs and gives: memory per block, decode speed, drift.

Prints JSON. For each of fp32, bf16, int8 and nf4 (int8 and nf4 with fp32 and with bf16
compute), in this process, one after the other:

- ``block_bytes``: parameters, buffers and bitsandbytes' quantization statistics of one
  loaded block (block 0), after a first forward (nf4 repacks its weights for the CPU kernel
  then); ``kv_bytes_per_token``: the block's KV cache per token, in the compute dtype;
- ``decode_tok_s``: single-stream decode steps per second through a span of ``--blocks``
  blocks, each step one token with its KV cache, median of ``--repeats`` runs of
  ``--tokens`` steps after a ``--prompt-tokens`` prefill;
- accuracy of the whole model (every block in that precision, the gateway's fp32 head)
  against fp32 on a few prompts: ``max_abs_logit_diff``, ``rel_logit_error`` (L2 of the
  difference over L2 of fp32's, worst prompt), ``top1_agreement`` (share of positions whose
  argmax matches fp32's); and greedy answers to a few chat questions, ``--greedy-tokens``
  each: ``greedy_identical`` (share of answers equal to fp32's) and
  ``greedy_common_prefix`` (tokens they share with fp32's before they part, mean).
  ``--no-accuracy`` skips all of it, ``--accuracy-prompts N`` takes the first N of each.

Ratios are against the fp32 run of the same process.

    python bench/precision.py [--model smollm2] [--blocks 4] [--tokens 64] [--repeats 3]
                              [--record]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import add_record_flag, finish
from models.loading import Head, Span, load_config, load_head, load_span
from models.quantization import module_bytes
from models.resolve import resolve_model
from swarm_node.backend import forward_span, new_kv_buffers

PRECISIONS = [
    ("float32", "none"),
    ("bfloat16", "none"),
    ("float32", "int8"),
    ("bfloat16", "int8"),
    ("float32", "nf4"),
    ("bfloat16", "nf4"),
]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
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
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis briefly.",
    "List three prime numbers.",
    "Who wrote Hamlet?",
    "Give me a tip for learning Python.",
]


def precision_name(dtype: str, quant: str) -> str:
    return dtype if quant == "none" else f"{dtype}/{quant}"


@torch.inference_mode()
def decode_rate(span: Span, prompt: torch.Tensor, tokens: int) -> float:
    kv = new_kv_buffers(span, span.start, span.end)
    forward_span(span, prompt, kv)
    step, position = prompt[:, -1:], prompt.shape[1]
    for _ in range(2):  # warm-up
        forward_span(span, step, kv, position=position)
        position += 1
    began = time.perf_counter()
    for _ in range(tokens):
        forward_span(span, step, kv, position=position)
        position += 1
    return tokens / (time.perf_counter() - began)


@torch.inference_mode()
def logits(head: Head, span: Span, prompts: list[torch.Tensor]) -> list[torch.Tensor]:
    return [head.lm_head(head.norm(forward_span(span, head.embed(p), None)))[0] for p in prompts]


@torch.inference_mode()
def greedy(head: Head, span: Span, prompt: torch.Tensor, tokens: int) -> list[int]:
    """``tokens`` greedy tokens after ``prompt``, decoded one at a time with a KV cache."""
    kv = new_kv_buffers(span, span.start, span.end)
    out: list[int] = []
    step, position = prompt, 0
    for _ in range(tokens):
        hidden = forward_span(span, head.embed(step), kv, position=position)
        position += step.shape[1]
        out.append(int(head.lm_head(head.norm(hidden[:, -1])).argmax()))
        step = torch.tensor([[out[-1]]])
    return out


def agreement(got: list[list[int]], want: list[list[int]]) -> dict[str, float]:
    def common(a: list[int], b: list[int]) -> int:
        return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))

    pairs = list(zip(got, want, strict=True))
    return {
        "greedy_identical": sum(g == w for g, w in pairs) / len(pairs),
        "greedy_common_prefix": statistics.mean(common(g, w) for g, w in pairs),
    }


def accuracy(got: list[torch.Tensor], want: list[torch.Tensor]) -> dict[str, float]:
    pairs = list(zip(got, want, strict=True))
    agree = sum(int((g.argmax(-1) == w.argmax(-1)).sum()) for g, w in pairs)
    return {
        "max_abs_logit_diff": max(float((g - w).abs().max()) for g, w in pairs),
        "rel_logit_error": max(float((g - w).norm() / w.norm()) for g, w in pairs),
        "top1_agreement": agree / sum(w.shape[0] for w in want),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--greedy-tokens", type=int, default=24)
    parser.add_argument("--no-accuracy", action="store_true")
    parser.add_argument(
        "--accuracy-prompts",
        type=int,
        default=len(PROMPTS),
        help="how many of the prompts, and of the chat questions, to compare (default: all)",
    )
    add_record_flag(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    source = resolve_model(args.model)
    config = load_config(source.path)
    head = load_head(source.path)
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    prompts = [
        tokenizer(p, return_tensors="pt")["input_ids"] for p in PROMPTS[: args.accuracy_prompts]
    ]
    with torch.inference_mode():
        prompt = head.embed(torch.arange(args.prompt_tokens).unsqueeze(0) + 1000)
    results: dict[str, dict[str, float]] = {}
    chats = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )["input_ids"]
        for q in QUESTIONS[: args.accuracy_prompts]
    ]
    reference: list[torch.Tensor] = []
    reference_answers: list[list[int]] = []
    # Speed first, round robin over the precisions, so that load from other processes on
    # the machine spreads over all of them instead of landing on one.
    spans = {p: load_span(source.path, 0, args.blocks, DTYPES[p[0]], p[1]) for p in PRECISIONS}
    rates: dict[tuple[str, str], list[float]] = {p: [] for p in PRECISIONS}
    for _ in range(args.repeats):
        for p, span in spans.items():
            rates[p].append(decode_rate(span, prompt, args.tokens))
    for (dtype, quant), span in spans.items():
        row = {
            "block_bytes": module_bytes(span.layers[0]),
            "kv_bytes_per_token": new_kv_buffers(span, 0, 1).shape.bytes_per_token_per_block,
            "decode_tok_s": statistics.median(rates[dtype, quant]),
        }
        if not args.no_accuracy:
            whole = load_span(source.path, 0, config.num_hidden_layers, DTYPES[dtype], quant)
            got = logits(head, whole, prompts)
            answers = [greedy(head, whole, c, args.greedy_tokens) for c in chats]
            reference = reference or got
            reference_answers = reference_answers or answers
            row |= accuracy(got, reference) | agreement(answers, reference_answers)
        results[precision_name(dtype, quant)] = row
    base = results["float32"]
    for row in results.values():
        row["bytes_ratio"] = row["block_bytes"] / base["block_bytes"]
        row["speed_ratio"] = row["decode_tok_s"] / base["decode_tok_s"]
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "model": source.name,
        "span_blocks": args.blocks,
        "prompt_tokens": args.prompt_tokens,
        "decode_tokens": args.tokens,
        "repeats": args.repeats,
        "accuracy_prompts": len(prompts),
        "greedy_questions": len(chats),
        "greedy_tokens": args.greedy_tokens,
        "torch_threads": torch.get_num_threads(),
        "precisions": results,
    }
    finish("precision", result, args)
    return result


if __name__ == "__main__":
    main()
