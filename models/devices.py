"""Where a process computes: choosing its device and dtype, and moving tensors between the
device and the host. Every device decision of swarmgate goes through here.

``--device auto`` picks CUDA, then Apple's MPS, then the CPU. ``--dtype auto`` picks what
the device computes fast and exactly enough: bfloat16 on a CUDA device that supports it
(Ampere and newer), else float16 there, float16 on MPS, float32 on the CPU (whose bf16
matmuls round differently from fp32 and, without avx512_bf16, run slowly).

Hidden states cross the wire as CPU tensors. On CUDA they go up through pinned (page-locked)
memory with non-blocking copies and come back the same way, so a copy is one DMA transfer
instead of a staged one; callers run these copies on their compute threads, never on the
event loop, because a device-to-host copy waits for the device.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)
CPU = torch.device("cpu")


class DeviceError(ValueError):
    """A ``--device`` or ``--dtype`` this machine cannot serve; the message says why."""


def cuda_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(spec: str = "auto") -> torch.device:
    """The device ``spec`` names on this machine; ``DeviceError`` when it has none such."""
    spec = spec.strip().lower()
    if spec == "auto":
        if cuda_count():
            return torch.device("cuda", 0)
        return torch.device("mps") if mps_available() else CPU
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise DeviceError(f"--device {spec!r}: expected {DEVICE_CHOICES}") from None
    if device.type == "cpu":
        return CPU
    if device.type == "cuda":
        count = cuda_count()
        if not count:
            raise DeviceError(
                f"--device {spec}: this machine has no CUDA device that torch can use "
                f"(torch {torch.__version__}, built for CUDA: {torch.version.cuda or 'no'})"
            )
        index = 0 if device.index is None else device.index
        if index >= count:
            raise DeviceError(f"--device {spec}: this machine has {count} CUDA device(s)")
        return torch.device("cuda", index)
    if device.type == "mps":
        if not mps_available():
            raise DeviceError(f"--device {spec}: MPS is not available on this machine")
        return device
    raise DeviceError(f"--device {spec!r}: expected {DEVICE_CHOICES}")


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """The compute dtype ``spec`` names, ``auto`` picking the device's best (see above)."""
    if spec != "auto":
        if spec not in DTYPES:
            raise DeviceError(f"--dtype {spec!r}: expected one of {', '.join(DTYPE_CHOICES)}")
        return DTYPES[spec]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` → ``bfloat16``: the name records and flags use."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class Placement:
    """A process's device and compute dtype, resolved once at start."""

    device: torch.device
    dtype: torch.dtype

    @classmethod
    def of(cls, device: str = "auto", dtype: str = "auto") -> Placement:
        where = resolve_device(device)
        return cls(where, resolve_dtype(dtype, where))

    def describe(self) -> str:
        """For the start-up log: which device, what it is, which dtype."""
        return f"{describe_device(self.device)}, {dtype_name(self.dtype)}"


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{device} ({props.name}, {props.total_memory / 2**30:.0f} GiB)"
    return str(device)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device``: through pinned memory and a non-blocking copy on CUDA
    (the device stream orders it before any kernel that reads it)."""
    if tensor.device == device:
        return tensor
    if device.type == "cuda" and tensor.device.type == "cpu" and not tensor.requires_grad:
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A device tensor on the CPU, complete when this returns: on CUDA, copied into pinned
    memory without blocking, then waited for (this thread only, not the event loop)."""
    if tensor.device.type == "cpu":
        return tensor
    if tensor.device.type == "cuda":
        out = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        out.copy_(tensor, non_blocking=True)
        torch.cuda.current_stream(tensor.device).synchronize()
        return out
    return tensor.cpu()


def free_bytes(device: torch.device) -> int | None:
    """Memory the device has free now, or None where only the host's memory counts (CPU)
    or the device cannot say."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "mps":
        mps = getattr(torch, "mps", None)
        if mps is None or not hasattr(mps, "recommended_max_memory"):
            return None
        return int(mps.recommended_max_memory() - mps.driver_allocated_memory())
    return None


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work: what a timing of device work must do."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def node_devices(spec: str, nodes: int) -> list[str]:
    """The ``--device`` of each of ``nodes`` local block servers: one per CUDA device, in
    turn, when ``spec`` leaves the choice (``auto`` or ``cuda``) and the machine has
    several; otherwise ``spec`` for all."""
    count = cuda_count()
    if spec.strip().lower() in ("auto", "cuda") and count > 1:
        return [f"cuda:{i % count}" for i in range(nodes)]
    return [spec] * nodes
