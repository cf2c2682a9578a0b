"""Weight quantization of a span's blocks through bitsandbytes (CPU or GPU).

``int8``: every ``nn.Linear`` becomes a ``bnb.nn.Linear8bitLt`` (LLM.int8() row-wise absmax
weights, ``has_fp16_weights=False``, activations quantized per row): logits stay close to
the unquantized span's, but greedy answers of a small model such as SmolLM2 differ after a
few tokens.
``nf4``: every ``nn.Linear`` becomes a ``bnb.nn.Linear4bit`` with 4-bit NormalFloat weights
in blocks of 64; approximate, it changes greedy answers, so never promise token-exactness.

Only true ``nn.Linear`` modules are quantized, which is where the weights of dense models
are. Everything else keeps the span's dtype on purpose:

- norms: one vector of ``hidden_size`` per norm, nothing to save, and their scales multiply
  every activation, so their error would reach everything downstream;
- rotary tables are computed, not stored, and stay fp32 (see ``models.loading``);
- MoE routers (``MixtralTopKRouter`` in transformers 5 holds a bare ``nn.Parameter``): tiny,
  and the top-k choice is discrete, so a small error there picks other experts outright;
- MoE experts in transformers 5 are fused 3D parameters (``MixtralExperts.gate_up_proj``
  ``[experts, 2 * intermediate, hidden]``), not ``nn.Linear``: bitsandbytes' layers do not
  take them, so a Mixtral span saves memory on attention only. ``quantize_blocks`` reports
  the share of parameters it left alone so that a node can say so in its log.

bitsandbytes quantizes when a parameter first moves to a real device: ``Int8Params`` and
``Params4bit`` keep the full-precision tensor at construction and quantize on ``.to(device)``
(checked with 0.50.2: the data turns int8 / packed uint8 then). On a CPU with avx512_bf16
the first forward of a ``Linear4bit`` in eval mode repacks its weight for the fused CPU
kernel (absmax un-nested to bf16), so memory is steady only after one forward.

That repack (``bitsandbytes.functional._convert_weight_packed_for_cpu``) takes the weight
in tiles of 32 output rows (it asserts ``out_features % 32 == 0``) and reshapes the absmax
to one per 64 inputs of each row (a ``RuntimeError`` unless ``in_features % 64 == 0``).
bitsandbytes has no fallback for other shapes there: the first forward fails, which a node
would meet only in its throughput measurement. Its generic path (CPUs without avx512_bf16,
GPUs) takes any shape. So where the repack will run, ``quantize_blocks`` refuses nf4 for a
span with such a linear before touching it, with a ``QuantizationError`` that names the
first one and suggests int8 (any shape) or none.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

QUANTS = ("none", "int8", "nf4")

# LLM.int8()'s outlier threshold, transformers' default (`llm_int8_threshold`): activation
# columns with a value above it are multiplied in fp16, the rest in int8. In eval mode on
# CPU, Linear8bitLt quantizes activations per row to int8 too, not only weights, so int8
# changes greedy answers as well. Measured on SmolLM2 (all 30 blocks, fp32 compute, vs
# fp32): threshold 6 gives a relative logit error of 0.16 and greedy answers that keep
# fp32's first 5.2 tokens on average (6 questions); threshold 0 gives 0.25 and 2.8 tokens,
# about 15% faster. bitsandbytes' weight-only CPU path (dequantize, then an fp matmul: what
# it runs in training mode) gives 0.05 but decodes ~10x slower, so it is not offered.
INT8_THRESHOLD = 6.0

# nf4 weights carry one absmax per this many consecutive weights (bitsandbytes' default).
NF4_BLOCKSIZE = 64
# Output rows per tile of the fused CPU nf4 kernel's repacked weight (its ``block_n``).
NF4_CPU_TILE_ROWS = 32


class QuantizationError(ValueError):
    """A span that this quantization cannot serve here; the message names the layer."""


@dataclass(frozen=True)
class QuantizedSpan:
    """What ``quantize_blocks`` did: how many linears it replaced and what it left alone."""

    quant: str
    linears: int
    quantized_params: int  # elements of the replaced weights
    kept_params: int  # elements of every other parameter (norms, routers, fused experts)

    def __add__(self, other: QuantizedSpan) -> QuantizedSpan:
        """Both spans' counts: blocks quantized one at a time sum to the span's."""
        return QuantizedSpan(
            self.quant,
            self.linears + other.linears,
            self.quantized_params + other.quantized_params,
            self.kept_params + other.kept_params,
        )


def quantize_blocks(
    layers: list[torch.nn.Module],
    quant: str,
    compute_dtype: torch.dtype,
    *,
    first_block: int = 0,
    device: torch.device | None = None,
    log: bool = True,
) -> QuantizedSpan:
    """Replace, in place, every ``nn.Linear`` of ``layers`` by its bitsandbytes counterpart.

    ``compute_dtype`` is the span's dtype: nf4 dequantizes into it; activations, KV cache and
    everything that is not an ``nn.Linear`` stay in it. ``quant="none"`` changes nothing.
    ``first_block`` is the model's index of ``layers[0]``, for error messages. ``device``:
    where the quantized linears go (default: where their weights are); the weights must be
    on the host then, as bitsandbytes quantizes while moving them. ``log``: say what was
    done (``log_quantized`` says it once for blocks quantized one by one).

    Raises ``QuantizationError``, before changing anything, for nf4 on a CPU whose fused
    kernel cannot take a linear's shape (see the module docstring).
    """
    if quant not in QUANTS:
        raise ValueError(f"unknown quantization {quant!r} (known: {', '.join(QUANTS)})")
    total = sum(p.numel() for layer in layers for p in layer.parameters())
    if quant == "none":
        return QuantizedSpan(quant, 0, 0, total)
    found = list(_linears(layers))
    target = device or (found[0].linear.weight.device if found else torch.device("cpu"))
    bnb = check_quantizable(layers, quant, target, first_block=first_block)
    quantized = 0
    for site in found:
        new = _replace(bnb, site.linear, quant, compute_dtype, device or site.linear.weight.device)
        setattr(site.parent, site.attr, new)
        quantized += site.linear.weight.numel()
    done = QuantizedSpan(quant, len(found), quantized, total - quantized)
    if log:
        log_quantized(done, compute_dtype)
    return done


def check_quantizable(
    layers: list[torch.nn.Module], quant: str, device: torch.device, *, first_block: int = 0
) -> Any:
    """Refuse (``QuantizationError``) blocks that ``quant`` cannot serve on ``device``;
    ``layers`` may be on the meta device, so a span is checked whole before any of it
    loads. Returns bitsandbytes, imported."""
    bnb = _import_bitsandbytes()
    if quant == "nf4":
        if _nf4_repacks_for_cpu(bnb, device):
            _check_nf4_cpu_shapes(list(_linears(layers)), first_block)
        _log_kernels_hint()
    return bnb


def log_quantized(done: QuantizedSpan, compute_dtype: torch.dtype) -> None:
    if done.quant == "none":
        return
    logger.info(
        "%s: quantized %d linear layers; %.1f%% of the blocks' parameters stay %s "
        "(norms, MoE routers, fused MoE experts)",
        done.quant,
        done.linears,
        100 * done.kept_params / max(done.quantized_params + done.kept_params, 1),
        str(compute_dtype).removeprefix("torch."),
    )


@dataclass(frozen=True)
class _Linear:
    block: int  # index in the span
    name: str  # qualified name in its block, e.g. "mlp.down_proj"
    parent: torch.nn.Module
    attr: str
    linear: torch.nn.Linear


def _linears(layers: list[torch.nn.Module]) -> Iterator[_Linear]:
    for block, layer in enumerate(layers):
        for path, parent in list(layer.named_modules()):
            for attr, child in list(parent.named_children()):
                if type(child) is torch.nn.Linear:
                    name = f"{path}.{attr}" if path else attr
                    yield _Linear(block, name, parent, attr, child)


def _nf4_repacks_for_cpu(bnb: Any, device: torch.device) -> bool:
    """Whether bitsandbytes will repack nf4 weights on ``device`` for its fused CPU kernel
    (what ``Linear4bit.forward`` checks, in eval mode without gradients)."""
    return device.type == "cpu" and bool(bnb.functional.has_avx512bf16())


def _check_nf4_cpu_shapes(found: list[_Linear], first_block: int) -> None:
    bad = [
        site
        for site in found
        if site.linear.out_features % NF4_CPU_TILE_ROWS or site.linear.in_features % NF4_BLOCKSIZE
    ]
    if not bad:
        return
    site = bad[0]
    more = f" (and {len(bad) - 1} more linear layers)" if len(bad) > 1 else ""
    raise QuantizationError(
        f"--quant nf4 cannot serve block {first_block + site.block} {site.name} "
        f"(in_features {site.linear.in_features}, out_features {site.linear.out_features})"
        f"{more}: bitsandbytes' nf4 kernel for CPUs with avx512_bf16 needs out_features "
        f"divisible by {NF4_CPU_TILE_ROWS} and in_features by {NF4_BLOCKSIZE}. "
        "Serve this model with --quant int8 or --quant none."
    )


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes held by ``module``'s parameters and buffers, with the quantization statistics
    that bitsandbytes keeps beside them rather than as buffers (int8 row scales, 4-bit
    absmax and codebooks). Tensors shared between modules count once."""
    seen: dict[int, int] = {}
    for tensor in [*module.parameters(), *module.buffers(), *_statistics(module)]:
        seen[tensor.data_ptr()] = tensor.numel() * tensor.element_size()
    return sum(seen.values())


def _statistics(module: torch.nn.Module) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    for m in module.modules():
        weight, matmul = getattr(m, "weight", None), getattr(m, "state", None)
        # Linear8bitLt moves its row scales from the weight to its matmul state on the
        # first forward.
        for holder in (weight, matmul):
            if isinstance(getattr(holder, "SCB", None), torch.Tensor):
                found.append(holder.SCB)  # type: ignore[union-attr]
        state = getattr(weight, "quant_state", None)
        while state is not None:
            found += [t for t in (state.absmax, state.code, state.offset) if t is not None]
            state = state.state2 if getattr(state, "nested", False) else None
    return found


def _replace(
    bnb: Any, linear: torch.nn.Linear, quant: str, dtype: torch.dtype, device: torch.device
) -> Any:
    shape = (linear.in_features, linear.out_features, linear.bias is not None)
    weight = linear.weight.data
    # Built on the meta device so that the constructor's own fp32 weight is never allocated.
    if quant == "int8":
        new = bnb.nn.Linear8bitLt(
            *shape, has_fp16_weights=False, threshold=INT8_THRESHOLD, device="meta"
        )
        new.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        new = bnb.nn.Linear4bit(*shape, compute_dtype=dtype, quant_type="nf4", device="meta")
        new.weight = bnb.nn.Params4bit(
            weight,
            requires_grad=False,
            quant_type="nf4",
            blocksize=NF4_BLOCKSIZE,
            module=new,
        )
    if linear.bias is not None:
        new.bias = torch.nn.Parameter(linear.bias.data, requires_grad=False)
    # Moving to the device is what quantizes (see the module docstring).
    return new.to(device).eval()


def _import_bitsandbytes() -> Any:
    # Its import runs torch.jit.script_method, deprecated in torch 2.13: noise in node logs
    # that says nothing about this server.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import bitsandbytes

    logging.getLogger("bitsandbytes.autograd._functions").addFilter(_drop_cast_warning)
    return bitsandbytes


def _drop_cast_warning(record: logging.LogRecord) -> bool:
    # Linear8bitLt warns on every call, i.e. 7 times per block per decode step, that its
    # input is cast to fp16 to be quantized: that is how LLM.int8() works, not news.
    return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


@functools.cache
def _log_kernels_hint() -> None:
    if importlib.util.find_spec("kernels") is not None:
        return
    # bitsandbytes itself warns on import ("Failed to load CPU gemm_4bit_forward from
    # kernels-community") when the CPU has avx512_bf16; this says what it means for us.
    logger.info(
        "nf4: the optional `kernels` package (pip install 'kernels>=0.11.1') would speed up "
        "4-bit matmuls on CPU: bitsandbytes then fetches kernels-community/"
        "quantization-bitsandbytes from the Hugging Face Hub. Without it, bitsandbytes' "
        "built-in kernel runs (and bitsandbytes warns about it when imported)."
    )
