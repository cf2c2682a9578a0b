"""What a fine-tuning run is told: the model, the swarm, the data and the LoRA's shape.

A field set from the command line carries its flag in its metadata, as the node's and the
gateway's settings do (swarmgate/flags.py reads it); `--device`, `--dtype` and
`--namespace` are declared by the node's settings and fill these too. The LoRA's targets
come from `--targets`, a spec (`q_proj,v_proj` or `all`) that only the model's projections
resolve, so the command fills that field itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from protocol.membership import Membership

MAX_RETRIES = 3  # runs of one step after the first that failed
CALL_TIMEOUT_S = 300.0  # one call, sending, compute and reply: a long span on a busy CPU
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def _flag(name: str, help: str, **meta: object) -> dict[str, object]:
    """A finetune flag's metadata: read from the command line only (no variable)."""
    return {"flag": name, "help": help, "env": None, **meta}


@dataclass(frozen=True)
class FinetuneSettings:
    model_name: str  # the swarm's model id; also the adapter's base_model_name_or_path
    model_path: Path  # the local model folder (tokenizer, embedding, norm, LM head)
    initial_peers: tuple[str, ...]
    data: Path = field(
        metadata=_flag(
            "--data", 'JSONL: {"messages": [...]}, {"prompt", "completion"} or {"text"} per line'
        )
    )
    out: Path = field(metadata=_flag("--out", "folder for the peft adapter"))
    rank: int = field(default=8, metadata=_flag("--rank", "LoRA rank (max 64)", check="positive"))
    alpha: int = field(default=16, metadata=_flag("--alpha", "LoRA alpha", check="positive"))
    targets: tuple[str, ...] = DEFAULT_TARGETS  # resolved from --targets
    steps: int = field(default=100, metadata=_flag("--steps", "training steps", check="positive"))
    lr: float = field(default=1e-3, metadata=_flag("--lr", "AdamW learning rate", check="positive"))
    batch_size: int = field(
        default=4, metadata=_flag("--batch-size", "examples per step", check="positive")
    )
    max_length: int = field(
        default=256,
        metadata=_flag("--max-length", "tokens per example (cut beyond)", check="positive"),
    )
    seed: int = field(
        default=0,
        metadata=_flag("--seed", "seeds the adapter's start and the data's order"),
    )
    membership: Membership | None = None
    namespace: str = field(default="", metadata={"flag": "--namespace"})
    model_revision: str = ""  # the commit of a Hub model (servers' records carry it); "" local
    # Where the head and the loss compute (models/devices.py).
    device: str = field(default="auto", metadata={"flag": "--device"})
    dtype: str = field(default="auto", metadata={"flag": "--dtype"})
    max_retries: int = MAX_RETRIES
    call_timeout_s: float = CALL_TIMEOUT_S
