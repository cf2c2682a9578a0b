"""The GPU suite: what matters, rerun on ``cuda:0``. Without CUDA every test here is skipped
and the skip says why (``pytest -ra`` lists it). ``SWARMGATE_TEST_DEVICE=cpu`` runs the
suite on the CPU instead, to check the tests themselves on a machine without a GPU."""

from __future__ import annotations

import os

import pytest
import torch

DEVICE_ENV = "SWARMGATE_TEST_DEVICE"


def suite_device() -> torch.device | None:
    """The device the suite runs on, or None (skipped)."""
    forced = os.environ.get(DEVICE_ENV)
    if forced:
        return torch.device(forced)
    return torch.device("cuda", 0) if torch.cuda.is_available() else None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = os.path.dirname(__file__)
    mine = [item for item in items if str(item.fspath).startswith(here)]
    for item in mine:
        item.add_marker(pytest.mark.gpu)
    if suite_device() is None:
        skip = pytest.mark.skip(
            reason=f"no CUDA device: the GPU suite (tests/gpu) runs on cuda:0 ({DEVICE_ENV}=cpu "
            "runs it here)"
        )
        for item in mine:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def device() -> torch.device:
    found = suite_device()
    assert found is not None  # the items were skipped otherwise
    return found
