"""Fine-tuning through the swarm: the client holds a LoRA adapter and trains it while the
servers run the frozen blocks forward and backward (``swarm_node/training.py``)."""

from training.data import DataError, Example, read_examples
from training.lora import ClientLora
from training.trainer import FinetuneSettings, TrainResult, train_lora

__all__ = [
    "ClientLora",
    "DataError",
    "Example",
    "FinetuneSettings",
    "TrainResult",
    "read_examples",
    "train_lora",
]
