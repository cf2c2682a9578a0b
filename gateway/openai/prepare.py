"""Checks and conversions every completion endpoint shares: request → GenerationRequest."""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from dataclasses import dataclass

from gateway.engine.generation import GenerationRequest
from gateway.engine.sampling import SamplingParams
from gateway.openai.models import SamplingRequest
from gateway.settings import GatewaySettings
from protocol.errors import ContextLengthExceeded, InvalidRequest, ModelNotFound


@dataclass(frozen=True)
class ServedModel:
    id: str
    max_length: int  # the model's context window in tokens
    vocab_size: int
    created: int
    # The LoRA adapters online servers offer now, requested as model "{id}:{adapter}".
    adapters: Callable[[], Collection[str]] = lambda: ()


@dataclass(frozen=True)
class RequestLimits:
    """What the gateway fills in, or cuts short, when a request leaves it open (by default
    as a gateway's settings do: their defaults are written there once)."""

    # When a chat request sets no max_tokens (still ≤ context).
    default_max_tokens: int = GatewaySettings.default_max_tokens
    max_generation_s: float = GatewaySettings.max_generation_s  # then it ends with "length"


def requested_adapter(model: ServedModel, requested: str) -> str | None:
    """The LoRA adapter a request's model names (``BASE:ADAPTER``), or None for the base
    model; ``ModelNotFound`` for anything the swarm does not serve."""
    if requested == model.id:
        return None
    base, colon, adapter = requested.rpartition(":")
    if colon and base == model.id and adapter in model.adapters():
        return adapter
    raise ModelNotFound(
        f"the model {requested!r} does not exist; this gateway serves {model.id!r}"
        + "".join(f", {f'{model.id}:{name}'!r}" for name in sorted(model.adapters())[:16])
    )


def check_token_ids(model: ServedModel, ids: list[int], param: str) -> None:
    bad = [t for t in ids if not 0 <= t < model.vocab_size]
    if bad:
        raise InvalidRequest(
            f"{param}: token {bad[0]} is outside the vocabulary of {model.vocab_size} tokens",
            param=param,
        )


def generation_request(
    model: ServedModel,
    prompt: list[int],
    request: SamplingRequest,
    *,
    conversation_key: str | None,
    tenant: str = "",
    param: str,
    limits: RequestLimits,
    received_at: float | None = None,
) -> GenerationRequest:
    """Fit the request to the model's context and the gateway's limits, and collect its
    sampling parameters (``received_at``: when the request arrived, by ``time.monotonic``)."""
    if not prompt:
        raise InvalidRequest("the prompt is empty", param=param)
    room = model.max_length - len(prompt)
    limit = request.token_limit()
    if room <= 0 or (limit is not None and limit > room):
        # OpenAI's own wording, which clients and frameworks recognise.
        wanted = limit or 1
        raise ContextLengthExceeded(
            f"This model's maximum context length is {model.max_length} tokens. However, you "
            f"requested {len(prompt) + wanted} tokens ({len(prompt)} in the {param}, {wanted} "
            f"in the completion). Please reduce the length of the {param} or completion.",
            param=param,
        )
    bias = {int(token): value for token, value in (request.logit_bias or {}).items()}
    check_token_ids(model, list(bias), "logit_bias")
    sampling = SamplingParams(
        temperature=1.0 if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        seed=request.seed,
        presence_penalty=request.presence_penalty or 0.0,
        frequency_penalty=request.frequency_penalty or 0.0,
        logit_bias=bias,
    )
    received_at = time.monotonic() if received_at is None else received_at
    return GenerationRequest(
        prompt,
        min(limits.default_max_tokens, room) if limit is None else limit,
        sampling,
        request.stop_sequences(),
        conversation_key=conversation_key,
        tenant=tenant,
        received_at=received_at,
        deadline=received_at + limits.max_generation_s,
        adapter=requested_adapter(model, request.model),
        speculate=request.speculate is not False,
    )
