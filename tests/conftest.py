from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny_model import build_lora_adapter, build_tiny_llama


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_adapter(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter of the tiny model that changes its greedy answers, named "pirate"."""
    return build_lora_adapter(tiny_model, tmp_path_factory.mktemp("adapters") / "pirate")
