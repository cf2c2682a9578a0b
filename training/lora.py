"""The LoRA adapter the client trains: its tensors for every block, initialised as peft
does, and saved as a folder that peft loads (``PeftModel.from_pretrained``)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import save_file

from models.loading import BlockLinear
from models.lora import peft_key
from protocol.rpc import LoraSpec

ADAPTER_WEIGHTS = "adapter_model.safetensors"


class ClientLora:
    """``lora_A`` [rank, in] and ``lora_B`` [out, rank] for each target of each block.

    As peft's default (``init_lora_weights=True``): A Kaiming-uniform, B zero, so the
    adapter starts as the identity; A is drawn from a generator seeded with ``seed``."""

    def __init__(
        self,
        linears: Mapping[str, BlockLinear],
        num_blocks: int,
        spec: LoraSpec,
        *,
        seed: int = 0,
        blocks_path: str = "model.layers",  # the family's (models/families.py)
    ) -> None:
        self.spec = spec
        self.blocks_path = blocks_path
        self.linears = {t: linears[t] for t in spec.targets}
        self.num_blocks = num_blocks
        generator = torch.Generator().manual_seed(seed)
        self._matrices: list[tuple[torch.nn.Parameter, torch.nn.Parameter]] = []
        for _ in range(num_blocks):
            for target in spec.targets:
                linear = linears[target]
                a = torch.empty(spec.rank, linear.in_features)
                torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
                b = torch.zeros(linear.out_features, spec.rank)
                self._matrices.append((torch.nn.Parameter(a), torch.nn.Parameter(b)))

    def parameters(self) -> list[torch.nn.Parameter]:
        return [m for pair in self._matrices for m in pair]

    def span(self, start: int, end: int) -> list[torch.nn.Parameter]:
        """The tensors of blocks ``[start, end)`` in wire order (``models/lora.py``)."""
        per_block = len(self.spec.targets)
        return [m for pair in self._matrices[start * per_block : end * per_block] for m in pair]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors under the names peft saves them with."""
        state = {}
        for index, (a, b) in enumerate(self._matrices):
            block, target = divmod(index, len(self.spec.targets))
            linear = self.linears[self.spec.targets[target]]
            state[peft_key(block, linear, "A", self.blocks_path)] = a.detach().clone().contiguous()
            state[peft_key(block, linear, "B", self.blocks_path)] = b.detach().clone().contiguous()
        return state

    def save(self, folder: Path, base_model: str) -> None:
        """``adapter_config.json`` and ``adapter_model.safetensors`` into ``folder``."""
        folder.mkdir(parents=True, exist_ok=True)
        config = peft_config(self.spec, base_model)
        config.save_pretrained(str(folder))
        save_file(self.state_dict(), str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})


def peft_config(spec: LoraSpec, base_model: str) -> LoraConfig:
    return LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        target_modules=list(spec.targets),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model,
    )


def parse_targets(text: str, known: Sequence[str]) -> list[str]:
    """``q_proj,v_proj`` → the names, each a projection the model has (or "all")."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if names == ["all"]:
        return list(known)
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ValueError(
            f"unknown LoRA targets {', '.join(unknown) or '(none)'}; "
            f"this model has {', '.join(known)}"
        )
    return names
