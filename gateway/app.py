"""The gateway's FastAPI application: wiring and lifecycle, no request logic."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import start_http_server
from starlette.exceptions import HTTPException
from transformers import PreTrainedTokenizerBase

from client.swarm_client import InferenceClient, SwarmClient
from client.swarm_view import SwarmView
from gateway.engine.affinity import SessionAffinity
from gateway.engine.affinity_stores import (
    AffinityStore,
    InMemoryAffinityStore,
    NoAffinity,
    RedisAffinityStore,
)
from gateway.engine.draft_model import DraftModel
from gateway.engine.drafting import Speculation
from gateway.engine.generation import Generator
from gateway.engine.grammar import GrammarCompiler
from gateway.engine.greedy_head import greedy_screen
from gateway.engine.head import HeadRunner, embed_ids
from gateway.metrics import GatewayMetrics
from gateway.openai.chat_service import ChatService
from gateway.openai.completion_service import CompletionService
from gateway.openai.errors import to_http_error
from gateway.openai.prepare import RequestLimits, ServedModel
from gateway.openai.templating import PromptBuilder
from gateway.responses.service import ResponsesService
from gateway.responses.store import InMemoryResponseStore, RedisResponseStore, ResponseStore
from gateway.settings import GatewaySettings
from gateway.web.auth import ApiKeyGuard
from gateway.web.limits import Admission, BodySizeLimit
from gateway.web.request_ids import RequestIdMiddleware
from gateway.web.routes import api, ops
from models.devices import Placement
from models.loading import load_config, load_head, load_tokenizer
from protocol.errors import RequestError, SwarmError
from protocol.latency import SIMULATED_RTT_ENV, SimulatedLink
from protocol.swarm import ModelRecord, dht_prefix

logger = logging.getLogger("swarmgate.gateway")


def create_app(
    settings: GatewaySettings,
    swarm_client: SwarmClient | None = None,
    affinity_store: AffinityStore | None = None,
) -> FastAPI:
    """The gateway app; it joins the DHT on startup unless a ``swarm_client`` is given, and
    keeps affinity in Redis with ``settings.redis_url``, else in memory."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        with _metrics_server(settings, app.state.metrics):
            async with _serving(app):
                yield

    @asynccontextmanager
    async def _serving(app: FastAPI) -> AsyncIterator[None]:
        config = load_config(settings.model_path)
        tokenizer = load_tokenizer(settings.model_path)
        placement = Placement.of(settings.device, settings.dtype)
        logger.info("embeddings and LM head on %s", placement.describe())
        weights = load_head(settings.model_path, placement.device, placement.dtype)
        screen = greedy_screen(weights.lm_head, settings.greedy_screen)
        logger.info(
            "greedy tokens: %s (--greedy-screen %s)",
            "screened through a bf16 copy of the LM head, checked in fp32"
            if screen is not None
            else "from the full LM head (a bf16 screen serves only an fp32 head on a CPU, "
            "and with auto only where it is faster)",
            settings.greedy_screen,
        )
        # Before the head's thread starts: a draft model refused ends the start-up here.
        speculation = _speculation(settings, tokenizer, placement)
        head = HeadRunner(weights, screen=screen, metrics=app.state.metrics)
        view = None
        swarm = swarm_client
        if swarm is None:
            view = SwarmView.join(
                settings.initial_peers,
                settings.membership,
                dht_prefix(settings.model_id, settings.namespace),
                ModelRecord.of(settings.model_id, config, revision=settings.model_revision),
                refresh_period_s=settings.refresh_period_s,
                max_refresh_period_s=settings.max_refresh_period_s,
                metrics=app.state.metrics,
                link=_simulated_link(),
            )
            # A failover replays a hop's inputs from the token embedding: the weights'
            # own, not a call back into the head's thread.
            swarm = InferenceClient(
                view,
                functools.partial(embed_ids, weights),
                step_floor_s=settings.step_floor_s,
                prefill_chunk_tokens=settings.prefill_chunk_tokens,
                push=settings.push,
            )
            try:
                await view.start()
            except BaseException:  # the lifespan's finally below is not reached yet
                await view.aclose()
                raise
        app.state.swarm = swarm
        metrics = app.state.metrics
        store = affinity_store or _affinity_store(settings)
        affinity = SessionAffinity(store, metrics)
        served = ServedModel(
            settings.model_id,
            max_length=config.max_position_embeddings,
            vocab_size=config.vocab_size,
            created=int(time.time()),
            adapters=lambda: swarm.snapshot().adapters(),
        )
        eos_ids = _eos_ids(config, tokenizer)
        generator = Generator(
            head,
            tokenizer,
            swarm,
            eos_ids,
            affinity,
            salt=settings.model_id,
            reuse=settings.affinity,
            metrics=metrics,
            speculation=speculation,
        )
        admission = _admission(settings)
        app.state.admission = admission
        metrics.queued.set_function(lambda: admission.waiting)
        limits = RequestLimits(settings.default_max_tokens, settings.max_generation_s)
        # Structured outputs need a fast tokenizer (every model we load has one); without,
        # chat refuses response formats other than text.
        grammars = (
            GrammarCompiler(
                tokenizer,
                eos_ids,
                vocab_size=config.vocab_size,
                cache_size=settings.grammar_cache_size,
                compile_timeout_s=settings.grammar_compile_timeout_s,
            )
            if tokenizer.is_fast
            else None
        )
        app.state.chat = ChatService(
            served, PromptBuilder(tokenizer), generator, limits, grammars=grammars
        )
        app.state.completions = CompletionService(served, tokenizer, generator, limits)
        responses = _response_store(settings, store)
        app.state.responses = ResponsesService(app.state.chat, responses)
        try:
            yield
        finally:
            await responses.aclose()
            if view is not None:
                await view.aclose()  # and leaves the swarm
            head.close()
            if grammars is not None:
                grammars.close()
            await store.aclose()

    app = FastAPI(title="swarmgate", lifespan=lifespan)
    app.state.api_keys = settings.api_keys
    app.state.send_timeout_s = settings.send_timeout_s
    app.state.metrics = GatewayMetrics()
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    # Added last, so it runs first: a caller without a key is refused before any reading.
    app.add_middleware(ApiKeyGuard, keys=settings.api_keys, metrics=app.state.metrics)
    app.add_middleware(RequestIdMiddleware)  # outermost: even a refusal carries an id
    app.include_router(api)
    app.include_router(ops)
    for exc_type in (RequestError, SwarmError, RequestValidationError, HTTPException, Exception):
        app.add_exception_handler(exc_type, _error_response)
    return app


def _speculation(
    settings: GatewaySettings, tokenizer: PreTrainedTokenizerBase, placement: Placement
) -> Speculation:
    """How streams draft (--speculate); with a draft model, loaded beside the head (same
    device and dtype), once for all streams."""
    draft = None
    if settings.speculate == "draft":
        if settings.draft_model is None:  # the command line refuses this before
            raise ValueError("--speculate draft needs --draft-model MODEL")
        draft = DraftModel.load(
            settings.draft_model,
            tokenizer,
            device=placement.device,
            dtype=placement.dtype,
            layers=settings.draft_layers,
            quantization=settings.draft_quantization,
        )
    if settings.speculate != "off":
        logger.info(
            "speculative decoding: %s drafts, at most %d per pass",
            settings.speculate if draft is None else f"{draft.name}'s",
            settings.speculate_tokens,
        )
    return Speculation(
        settings.speculate,
        settings.speculate_tokens,
        draft,
        max_streams=settings.speculate_max_streams,
    )


async def _error_response(request: Request, exc: Exception) -> JSONResponse:
    error = to_http_error(exc)
    request.app.state.metrics.requests.labels(str(error.status)).inc()
    return JSONResponse(error.body.model_dump(mode="json"), error.status, headers=error.headers)


def _simulated_link() -> SimulatedLink:
    """The delay ``SWARMGATE_SIMULATED_RTT_MS`` puts on every hop stream of this gateway
    (benchmarks only), read once as it starts and handed to the swarm client."""
    link = SimulatedLink.from_env()
    if link.enabled:
        logger.warning(
            "%s is set: every hop stream waits %.0f ms per round trip (benchmarks only)",
            SIMULATED_RTT_ENV,
            link.rtt_s * 1000,
        )
    return link


def _admission(settings: GatewaySettings) -> Admission:
    """The gateway's admission limits. A key's cap is its own (from the key file), else
    `--max-concurrent-per-key`, else, with API keys, the gateway's whole concurrency; without
    keys there is none unless asked for: a bearer token proves nothing there, so a cap per
    token would only refuse honest clients that send many requests at once."""
    per_key = settings.max_concurrent_per_key
    if per_key is None and settings.api_keys:
        per_key = settings.max_concurrent
    return Admission(
        settings.max_concurrent,
        settings.max_queue,
        per_key,
        caps=settings.key_limits if settings.api_keys else None,
        key_wait_s=settings.queue_timeout_s,
    )


@contextmanager
def _metrics_server(settings: GatewaySettings, metrics: GatewayMetrics) -> Iterator[None]:
    """/metrics without an API key on `--metrics-port`, while the app runs."""
    if settings.metrics_port is None:
        yield
        return
    server, thread = start_http_server(
        settings.metrics_port, addr=settings.metrics_host, registry=metrics.registry
    )
    logger.info("metrics on http://%s:%d/metrics", settings.metrics_host, server.server_port)
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _affinity_store(settings: GatewaySettings) -> AffinityStore:
    if not settings.affinity:
        return NoAffinity()
    if settings.redis_url:
        namespace = dht_prefix(settings.model_id, settings.namespace)
        return RedisAffinityStore(settings.redis_url, namespace=namespace)
    return InMemoryAffinityStore()


def _response_store(settings: GatewaySettings, affinity: AffinityStore) -> ResponseStore:
    """Stored responses live where affinity does: in Redis when the gateway has one (on the
    same connections), else in this process. Unlike affinity, they are kept with
    `--no-affinity` too: they are conversations, not cache hints."""
    namespace = dht_prefix(settings.model_id, settings.namespace)
    ttl_s = settings.response_ttl_s
    if isinstance(affinity, RedisAffinityStore):
        return RedisResponseStore(affinity.client, namespace=namespace, ttl_s=ttl_s)
    if settings.redis_url:
        import redis.asyncio as redis

        client = redis.from_url(settings.redis_url, socket_timeout=0.5, socket_connect_timeout=0.5)
        return RedisResponseStore(client, namespace=namespace, ttl_s=ttl_s, owned=True)
    return InMemoryResponseStore(ttl_s=ttl_s)


def _eos_ids(config: object, tokenizer: object) -> set[int]:
    """Every token that ends generation: the tokenizer's EOS and the config's."""
    ids: set[int] = set()
    for value in (getattr(tokenizer, "eos_token_id", None), getattr(config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(v for v in value if isinstance(v, int))
    return ids
