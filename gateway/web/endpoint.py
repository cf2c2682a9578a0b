"""What the routes need of an endpoint's service: the one interface that chat, completions
and the Responses API each implement (structurally: none of them imports this).

``Body`` is the parsed request, ``Prepared`` what ``prepare`` makes of it (templated and
tokenized, ready to open), ``Result`` the whole response and ``Chunk`` one streamed piece.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Protocol, TypeVar

from pydantic import BaseModel

from gateway.engine.generation import Generation
from routing.planner import Hop


class Streamable(Protocol):
    """A request that says whether its response streams."""

    @property
    def stream(self) -> bool: ...


Body = TypeVar("Body", bound=Streamable, contravariant=True)
Prepared = TypeVar("Prepared")
Result = TypeVar("Result", bound=BaseModel, covariant=True)
Chunk = TypeVar("Chunk", bound=BaseModel, covariant=True)


class Endpoint(Protocol[Body, Prepared, Result, Chunk]):
    def check(self, body: Body) -> None:
        """Refusals that need no tokenizer, made before the request waits for a slot."""
        ...

    def generations(self, body: Body) -> int:
        """How many generations the request runs at once: the slots it takes."""
        ...

    async def prepare(
        self, body: Body, conversation_key: str | None, *, received_at: float, tenant: str
    ) -> Prepared:
        """The request templated and tokenized, once it holds its slot."""
        ...

    async def open(self, prepared: Prepared) -> Generation:
        """Its first generation, opened before a stream's status line goes out."""
        ...

    async def close(self, generation: Generation) -> None: ...

    async def complete(self, body: Body, prepared: Prepared) -> tuple[Result, tuple[Hop, ...]]:
        """The whole response, and the route its first generation ran on."""
        ...

    def stream(
        self, body: Body, prepared: Prepared, first: Generation
    ) -> AsyncGenerator[Chunk, None]:
        """The response's chunks; ``first`` (from ``open``) is closed however it ends."""
        ...
