"""Choosing devices and dtypes (models/devices.py) on a machine with and without GPUs.

CUDA is faked where a choice depends on it (``cuda_count``, bf16 support); where tensors
must stay on a device, tests/unit/swarm_node/test_families.py runs spans on the meta
device, which refuses host tensors as CUDA does. tests/gpu runs the real thing."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from models import devices
from models.devices import DeviceError, Placement, node_devices, resolve_device, resolve_dtype


@pytest.fixture
def gpus(monkeypatch: pytest.MonkeyPatch) -> Callable[[int], None]:
    def have(count: int, *, bf16: bool = True) -> None:
        monkeypatch.setattr(devices, "cuda_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: bf16)

    return have


def test_auto_is_the_cpu_here_in_fp32() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    placement = Placement.of("auto", "auto")
    assert placement.device == torch.device("cpu")
    assert placement.dtype == torch.float32
    assert placement.describe() == "cpu, float32"


def test_auto_prefers_cuda_then_mps(
    gpus: Callable[..., None], monkeypatch: pytest.MonkeyPatch
) -> None:
    gpus(2)
    assert resolve_device("auto") == torch.device("cuda", 0)
    gpus(0)
    monkeypatch.setattr(devices, "mps_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps")


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("cuda", "no CUDA device"),
        ("cuda:1", "no CUDA device"),
        ("mps", "MPS is not available"),
        ("tpu", "expected auto, cpu, cuda, cuda:N or mps"),
        ("gpu", "expected auto, cpu, cuda, cuda:N or mps"),
    ],
)
def test_a_device_this_machine_lacks_is_a_clear_error(
    gpus: Callable[..., None], monkeypatch: pytest.MonkeyPatch, spec: str, says: str
) -> None:
    gpus(0)
    monkeypatch.setattr(devices, "mps_available", lambda: False)
    with pytest.raises(DeviceError, match=says):
        resolve_device(spec)


def test_cuda_indices_are_checked(gpus: Callable[..., None]) -> None:
    gpus(2)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("CUDA:1") == torch.device("cuda", 1)
    with pytest.raises(DeviceError, match="has 2 CUDA device"):
        resolve_device("cuda:2")


def test_auto_dtype_follows_the_device(gpus: Callable[..., None]) -> None:
    cuda = torch.device("cuda", 0)
    gpus(1, bf16=True)
    assert resolve_dtype("auto", cuda) == torch.bfloat16
    gpus(1, bf16=False)  # pre-Ampere
    assert resolve_dtype("auto", cuda) == torch.float16
    assert resolve_dtype("auto", torch.device("mps")) == torch.float16
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16  # asked: given
    with pytest.raises(DeviceError, match="--dtype 'int4'"):
        resolve_dtype("int4", torch.device("cpu"))


def test_up_puts_one_node_on_each_gpu(gpus: Callable[..., None]) -> None:
    gpus(4)
    assert node_devices("auto", 6) == ["cuda:0", "cuda:1", "cuda:2", "cuda:3", "cuda:0", "cuda:1"]
    assert node_devices("cuda", 2) == ["cuda:0", "cuda:1"]
    assert node_devices("cuda:2", 3) == ["cuda:2"] * 3  # a device named: all there
    assert node_devices("cpu", 2) == ["cpu", "cpu"]
    gpus(1)
    assert node_devices("auto", 2) == ["auto", "auto"]


def test_host_copies_are_no_ops_on_the_cpu() -> None:
    x = torch.randn(2, 3)
    assert devices.to_device(x, torch.device("cpu")) is x
    assert devices.to_host(x) is x
    assert devices.free_bytes(torch.device("cpu")) is None  # the host's memory: psutil's job


def test_the_kv_budget_on_a_gpu_is_its_free_memory_after_the_weights(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from swarm_node import node

    monkeypatch.setattr(node, "free_bytes", lambda device: 10 * 2**30)
    assert node.default_cache_bytes(torch.device("cuda", 0)) == int(10 * 2**30 * 0.9)
    monkeypatch.setattr(node, "free_bytes", lambda device: None)
    assert 0 < node.default_cache_bytes(torch.device("cpu")) < 2**50
