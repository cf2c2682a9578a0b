"""A node serving 2 of the 8 blocks of a ~1 GB sharded checkpoint holds those blocks'
bytes and a bounded overhead while it loads them, never the whole model: its peak RSS
(VmHWM), measured in a process of its own around `load_span`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig

from tests.processes import REPO

pytestmark = pytest.mark.slow

BLOCKS = 8
SERVED = (3, 5)
OVERHEAD = 150 * 2**20  # bytes beyond the served blocks' own
# About 113 MB of fp32 weights per block, 0.92 GB in all.
CONFIG = LlamaConfig(
    vocab_size=1024,
    hidden_size=1536,
    intermediate_size=4096,
    num_hidden_layers=BLOCKS,
    num_attention_heads=12,
    num_key_value_heads=12,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)

MEASURE = """
import gc, json, re, sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from models.loading import load_config, load_span



def peak_rss():  # bytes; getrusage's ru_maxrss also keeps exited threads' peaks: no reset
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", status)[1]) * 1024


folder, start, end = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
with torch.device("meta"):  # what load_span imports and builds before any weight
    AutoModelForCausalLM.from_config(load_config(folder))
measured = {}
for dtype in (torch.float32, torch.bfloat16):
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # Linux: the peak RSS restarts from now
    before = peak_rss()
    span = load_span(folder, start, end, dtype)
    # Read every weight, as serving does: safetensors maps fp32 files lazily.
    tensors = [t for layer in span.layers for t in layer.state_dict().values()]
    assert all(torch.isfinite(t.sum()) for t in tensors)
    after = peak_rss()
    held = sum(t.numel() * t.element_size() for t in tensors)
    measured[str(dtype)] = {"growth": after - before, "held": held}
    del span, tensors
print(json.dumps(measured))
"""


def block_tensors(block: int) -> dict[str, torch.Tensor]:
    h, inter = CONFIG.hidden_size, CONFIG.intermediate_size
    shapes = {
        "self_attn.q_proj.weight": (h, h),
        "self_attn.k_proj.weight": (h, h),
        "self_attn.v_proj.weight": (h, h),
        "self_attn.o_proj.weight": (h, h),
        "mlp.gate_proj.weight": (inter, h),
        "mlp.up_proj.weight": (inter, h),
        "mlp.down_proj.weight": (h, inter),
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
    }
    return {
        f"model.layers.{block}.{name}": torch.full(shape, 0.01 * (block + 1))
        for name, shape in shapes.items()
    }


def write_checkpoint(folder: Path) -> int:
    """The sharded checkpoint, one shard per block, written shard by shard (never a whole
    model in memory); the served blocks' bytes."""
    CONFIG.save_pretrained(folder)
    h = CONFIG.hidden_size
    rest = {
        "model.embed_tokens.weight": torch.full((CONFIG.vocab_size, h), 0.02),
        "model.norm.weight": torch.ones(h),
        "lm_head.weight": torch.full((CONFIG.vocab_size, h), 0.03),
    }
    count = BLOCKS + 1
    weight_map: dict[str, str] = {}
    served = 0
    for index in range(count):  # shard 1: embedding, norm, LM head; then a block each
        part = rest if index == 0 else block_tensors(index - 1)
        name = f"model-{index + 1:05d}-of-{count:05d}.safetensors"
        save_file(part, folder / name, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, name)
        if SERVED[0] <= index - 1 < SERVED[1]:
            served += sum(t.numel() * t.element_size() for t in part.values())
        del part
    index_json = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index_json))
    return served


def test_a_span_of_a_large_sharded_model_loads_within_its_blocks_bytes(tmp_path: Path) -> None:
    folder = tmp_path / "large"
    folder.mkdir()
    try:
        served = write_checkpoint(folder)
        total = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        assert total > 0.9e9
        out = subprocess.run(
            [sys.executable, "-c", MEASURE, str(folder), *map(str, SERVED)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        )
    finally:
        shutil.rmtree(folder)
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    fp32, bf16 = measured["torch.float32"], measured["torch.bfloat16"]
    assert fp32["held"] == served and bf16["held"] == served // 2
    for dtype, m in measured.items():
        # At least what it holds (the measure sees the blocks), at most the served blocks'
        # bytes in the checkpoint and a bounded overhead: never the other 6 blocks'.
        assert m["held"] <= m["growth"] <= served + OVERHEAD, (
            f"{dtype}: peak RSS grew {m['growth'] / 2**20:.0f} MiB loading "
            f"{served / 2**20:.0f} MiB of blocks ({m['held'] / 2**20:.0f} MiB held)"
        )
