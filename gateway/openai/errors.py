"""The one place where exceptions become OpenAI-shaped errors: the HTTP status and error
body of each, for the routes' responses and for errors a stream reports in-band (a
Responses stream's `response.failed`)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

from gateway.openai.answers import ErrorDetail, ErrorResponse
from gateway.openai.models import UNSUPPORTED
from protocol.errors import (
    CapacityExceeded,
    ContextLengthExceeded,
    ModelNotFound,
    NoRouteError,
    NotFound,
    PeerUnavailable,
    RequestError,
    StoreUnavailable,
    SwarmError,
    TooManyRequests,
    Unauthorized,
)

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 5  # what clients are told to wait when the swarm has no room or no route


@dataclass(frozen=True)
class HTTPError:
    status: int
    body: ErrorResponse
    headers: dict[str, str] | None = None


def _error(
    status: int,
    message: str,
    type_: str,
    *,
    param: str | None = None,
    code: str | None = None,
    retry: bool = False,
) -> HTTPError:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if retry else None
    detail = ErrorDetail(message=message, type=type_, param=param, code=code)
    return HTTPError(status, ErrorResponse(error=detail), headers)


def to_http_error(exc: BaseException) -> HTTPError:
    """Map any exception to its HTTP status and OpenAI error body."""
    if isinstance(exc, Unauthorized):
        return _error(401, exc.message, "invalid_request_error", code="invalid_api_key")
    if isinstance(exc, ModelNotFound):
        return _error(
            404, exc.message, "invalid_request_error", param="model", code="model_not_found"
        )
    if isinstance(exc, NotFound):
        return _error(404, exc.message, "invalid_request_error", param=exc.param, code=exc.code)
    if isinstance(exc, ContextLengthExceeded):
        return _error(
            400,
            exc.message,
            "invalid_request_error",
            param=exc.param,
            code="context_length_exceeded",
        )
    if isinstance(exc, TooManyRequests):
        return _error(429, exc.message, "rate_limit_error", code="rate_limit_exceeded", retry=True)
    if isinstance(exc, RequestError):
        return _error(400, exc.message, "invalid_request_error", param=exc.param, code=exc.code)
    if isinstance(exc, RequestValidationError):
        return _validation_error(exc)
    if isinstance(exc, HTTPException):
        return _error(exc.status_code, str(exc.detail), "invalid_request_error")
    if isinstance(exc, NoRouteError):
        return _error(
            503,
            f"the swarm cannot serve this model right now: {exc}",
            "service_unavailable_error",
            code="no_route",
            retry=True,
        )
    if isinstance(exc, CapacityExceeded):
        return _error(429, str(exc), "rate_limit_error", code="capacity_exceeded", retry=True)
    if isinstance(exc, PeerUnavailable):
        return _error(
            503,
            f"a server of the swarm failed: {exc}",
            "service_unavailable_error",
            code="peer_unavailable",
            retry=True,
        )
    if isinstance(exc, StoreUnavailable):
        return _error(
            503,
            f"the gateway's store is unavailable: {exc}",
            "service_unavailable_error",
            code="store_unavailable",
            retry=True,
        )
    if isinstance(exc, SwarmError):
        return _error(502, f"swarm error: {exc}", "server_error")
    logger.exception("unexpected error", exc_info=exc)
    return _error(500, "internal server error", "server_error")


def _validation_error(exc: RequestValidationError) -> HTTPError:
    first = exc.errors()[0] if exc.errors() else {}
    loc = tuple(first.get("loc", ()))
    if loc[:1] == ("query",):  # a query parameter goes by its own name, as a body's field
        loc = loc[1:]
    body_message = _body_message(first)
    if body_message is not None:
        return _error(400, body_message, "invalid_request_error")
    location = [str(part) for part in loc if part != "body"]
    param = ".".join(location) or None
    message = str(first.get("msg", "invalid request"))
    if first.get("type") == "value_error":  # pydantic's prefix; OpenAI's messages have none
        message = message.removeprefix("Value error, ")
    if param:
        message = f"{param}: {message}"
    code = UNSUPPORTED if first.get("type") == UNSUPPORTED else None
    return _error(400, message, "invalid_request_error", param=param, code=code)


# What a JSON body that is not an object is, by the Python type `json.loads` gives it.
_JSON_KINDS = {
    list: "an array",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "a boolean",
    type(None): "null",
}


def _body_message(error: Mapping[str, Any]) -> str | None:
    """The message for a body that is no JSON object at all (not JSON, empty, another JSON
    value, not sent as JSON), or None for an error inside one. Pydantic's own words there,
    "Input should be a valid dictionary", name neither a parameter nor the fix."""
    if error.get("type") == "json_invalid":  # OpenAI's wording, plus where it went wrong
        reason, at = error.get("ctx", {}).get("error"), tuple(error.get("loc", ()))[1:]
        where = f" ({reason} at character {at[0]})" if reason and at else ""
        return (
            "We could not parse the JSON body of your request. The API expects a JSON object, "
            f"but what was sent was not valid JSON{where}."
        )
    if tuple(error.get("loc", ())) != ("body",):
        return None
    if error.get("type") == "missing":
        return "The request body is empty; it must be a JSON object."
    if error.get("type") not in ("model_attributes_type", "model_type", "dict_type"):
        return None  # a validator of the whole body: its own message says what is wrong
    given = error.get("input")
    if isinstance(given, bytes):  # FastAPI reads a body as JSON only with a JSON content type
        return "The request body must be a JSON object, sent with Content-Type: application/json."
    kind = _JSON_KINDS.get(type(given))
    return f"The request body must be a JSON object, not {kind}." if kind else None
