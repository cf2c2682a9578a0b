"""How many blocks of a model fit on one GPU, computed from the model's config (no weights,
no GPU): the bytes of one block as swarmgate loads it (bf16, or nf4 through bitsandbytes)
from the block's real modules built on the meta device, and what is left for KV caches.

Prints JSON and a Markdown table. The configs are the public ones of Llama-3.1-8B and
Llama-3.1-70B (their config.json values that set the shapes), or any folder's config.json.

    python bench/fit.py [--gpus 24 48 80] [--kv-share 0.2] [--config FOLDER ...] [--record]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, LlamaConfig, PretrainedConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import add_record_flag, finish
from models.families import family_of
from swarm_node.kv_buffers import KVShape

LLAMA_31: dict[str, Any] = dict(
    vocab_size=128_256,
    max_position_embeddings=131_072,
    num_attention_heads=None,
    rope_theta=500_000.0,
)
CONFIGS = {
    "Llama-3.1-8B": LlamaConfig(
        **{**LLAMA_31, "num_attention_heads": 32},
        hidden_size=4096,
        intermediate_size=14_336,
        num_hidden_layers=32,
        num_key_value_heads=8,
    ),
    "Llama-3.1-70B": LlamaConfig(
        **{**LLAMA_31, "num_attention_heads": 64},
        hidden_size=8192,
        intermediate_size=28_672,
        num_hidden_layers=80,
        num_key_value_heads=8,
    ),
}
CONTEXT_BYTES = 1 << 30  # CUDA context, allocator slack and the activations of one forward
NF4_BLOCKSIZE = 64  # weights per absmax (bitsandbytes' default; swarmgate's)


def block_params(config: PretrainedConfig) -> tuple[int, int]:
    """(parameters in the block's nn.Linear weights, all other parameters) of one block."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    family = family_of(config)
    block = model.get_submodule(f"{family.blocks_path}.0")
    linear = sum(m.weight.numel() for m in block.modules() if type(m) is torch.nn.Linear)
    total = sum(p.numel() for p in block.parameters())
    return linear, total - linear


def block_bytes(config: PretrainedConfig, quant: str) -> int:
    linear, other = block_params(config)
    if quant == "nf4":  # 4 bits per weight, one fp32 absmax per 64; the rest stays bf16
        return linear // 2 + 4 * math.ceil(linear / NF4_BLOCKSIZE) + 2 * other
    return 2 * (linear + other)


def fits(config: PretrainedConfig, gpu_gb: float, quant: str, kv_share: float) -> dict[str, Any]:
    memory = gpu_gb * 1e9
    per_block = block_bytes(config, quant)
    for_weights = memory * (1 - kv_share) - CONTEXT_BYTES
    blocks = min(config.num_hidden_layers, max(0, int(for_weights // per_block)))
    kv_per_token = KVShape.of(config, torch.bfloat16).bytes_per_token_per_block * max(blocks, 1)
    left = memory - CONTEXT_BYTES - blocks * per_block
    return {
        "gpu_gb": gpu_gb,
        "quant": quant,
        "block_mb": per_block / 1e6,
        "blocks": blocks,
        "of": config.num_hidden_layers,
        "kv_tokens": int(left // kv_per_token) if blocks else 0,
        "gpus_for_model": math.ceil(config.num_hidden_layers / blocks) if blocks else None,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--gpus", type=float, nargs="+", default=[24, 48, 80])
    parser.add_argument(
        "--kv-share", type=float, default=0.2, help="of the GPU kept for KV caches (default 0.2)"
    )
    parser.add_argument("--config", nargs="*", default=[], help="model folders to add")
    add_record_flag(parser)
    args = parser.parse_args(argv)
    configs = dict(CONFIGS)
    for folder in args.config:
        configs[Path(folder).name] = AutoConfig.from_pretrained(folder)
    rows = [
        {"model": name, **fits(config, gpu, quant, args.kv_share)}
        for name, config in configs.items()
        for quant in ("bf16", "nf4")
        for gpu in args.gpus
    ]
    result = {"kv_share": args.kv_share, "context_bytes": CONTEXT_BYTES, "rows": rows}
    finish("fit", result, args)
    print("\n| model | weights | block | " + " | ".join(f"{g:g} GB GPU" for g in args.gpus) + " |")
    print("|---|---|---|" + "---|" * len(args.gpus))
    for name in configs:
        for quant in ("bf16", "nf4"):
            mine = [r for r in rows if r["model"] == name and r["quant"] == quant]
            cells = [
                f"{r['blocks']} of {r['of']} ({r['kv_tokens'] // 1000}k KV tokens)" for r in mine
            ]
            print(
                f"| {name} | {quant} | {mine[0]['block_mb']:.0f} MB | " + " | ".join(cells) + " |"
            )
    return result


if __name__ == "__main__":
    main()
