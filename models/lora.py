"""LoRA tensors of a span as both ends of a training call lay them out, and the names peft
gives them in a saved adapter.

Order (the wire's and the client's): for each block, for each target in the spec's order,
``lora_A`` ``[rank, in_features]`` then ``lora_B`` ``[out_features, rank]``. The scale
applied is peft's ``lora_alpha / rank``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from models.loading import BlockLinear

# A causal LM wrapped by peft: PeftModel → LoraModel → the HF model, whose blocks are
# ``{Family.blocks_path}.{i}``. Checked against peft's own save in the tests.
PEFT_PREFIX = "base_model.model."


def lora_shapes(
    linears: Mapping[str, BlockLinear], rank: int, targets: Sequence[str], blocks: int
) -> list[tuple[int, int]]:
    """Shapes of the LoRA tensors of ``blocks`` consecutive blocks, in wire order."""
    shapes = []
    for _ in range(blocks):
        for target in targets:
            linear = linears[target]
            shapes.append((rank, linear.in_features))
            shapes.append((linear.out_features, rank))
    return shapes


def peft_key(block: int, linear: BlockLinear, which: str, blocks_path: str) -> str:
    """The name of one LoRA matrix (``which``: "A" or "B") in ``adapter_model.safetensors``
    (``blocks_path``: the family's, such as ``model.layers``)."""
    return f"{PEFT_PREFIX}{blocks_path}.{block}.{linear.path}.lora_{which}.weight"
