"""to_http_error: every exception becomes one OpenAI-shaped error response."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

from gateway.openai.answers import ErrorResponse
from gateway.openai.errors import RETRY_AFTER_S, HTTPError, to_http_error
from protocol.errors import (
    CapacityExceeded,
    ContextLengthExceeded,
    InvalidRequest,
    ModelNotFound,
    NoRouteError,
    PeerUnavailable,
    ProtocolMismatch,
    SwarmError,
    Unauthorized,
)


def body_of(error: HTTPError) -> dict[str, Any]:
    """The JSON body, checked against OpenAI's error shape."""
    body = error.body.model_dump(mode="json")
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert ErrorResponse.model_validate(body) == error.body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


def validation_error(*errors: dict[str, Any]) -> RequestValidationError:
    return RequestValidationError(errors=list(errors))


# ---- client errors ----


def test_model_not_found_is_404() -> None:
    error = to_http_error(ModelNotFound("the model `gpt-9` does not exist"))
    assert error.status == 404
    body = body_of(error)
    assert body["code"] == "model_not_found"
    assert body["param"] == "model"
    assert body["type"] == "invalid_request_error"
    assert "gpt-9" in body["message"]
    assert error.headers is None


def test_context_length_exceeded_is_400() -> None:
    error = to_http_error(ContextLengthExceeded("too long", param="messages"))
    assert error.status == 400
    body = body_of(error)
    assert body["code"] == "context_length_exceeded"
    assert body["type"] == "invalid_request_error"
    assert body["param"] == "messages"
    assert body["message"] == "too long"


def test_invalid_request_is_400() -> None:
    error = to_http_error(InvalidRequest("bad n", param="n", code="invalid_value"))
    assert error.status == 400
    body = body_of(error)
    assert body == {
        "message": "bad n",
        "type": "invalid_request_error",
        "param": "n",
        "code": "invalid_value",
    }
    assert error.headers is None


def test_invalid_request_without_param_or_code() -> None:
    body = body_of(to_http_error(InvalidRequest("nope")))
    assert body["param"] is None and body["code"] is None


def test_unauthorized_is_401() -> None:
    error = to_http_error(Unauthorized("missing key"))
    assert error.status == 401
    assert body_of(error)["code"] == "invalid_api_key"


def test_http_exception_keeps_its_status() -> None:
    error = to_http_error(HTTPException(status_code=405, detail="Method Not Allowed"))
    assert error.status == 405
    assert body_of(error)["message"] == "Method Not Allowed"


# ---- swarm errors ----


def test_no_route_is_503_with_retry_after() -> None:
    error = to_http_error(NoRouteError("no online server holds blocks 3..5 (of 10)"))
    assert error.status == 503
    assert error.headers == {"Retry-After": str(RETRY_AFTER_S)}
    body = body_of(error)
    assert body["type"] == "service_unavailable_error"
    assert body["code"] == "no_route"
    assert "blocks 3..5" in body["message"]


def test_peer_unavailable_is_503() -> None:
    error = to_http_error(PeerUnavailable("connection reset", peer_id="QmPeer"))
    assert error.status == 503
    assert error.headers is not None and "Retry-After" in error.headers
    body = body_of(error)
    assert body["code"] == "peer_unavailable"
    assert body["type"] == "service_unavailable_error"


def test_capacity_exceeded_is_429_with_retry_after() -> None:
    error = to_http_error(CapacityExceeded("the gateway is busy"))
    assert error.status == 429
    assert error.headers == {"Retry-After": str(RETRY_AFTER_S)}
    assert int(error.headers["Retry-After"]) > 0
    body = body_of(error)
    assert body["type"] == "rate_limit_error"
    assert body["code"] == "capacity_exceeded"


@pytest.mark.parametrize("exc", [ProtocolMismatch("bad"), SwarmError("gone")])
def test_other_swarm_errors_are_502(exc: Exception) -> None:
    error = to_http_error(exc)
    assert error.status == 502
    assert body_of(error)["type"] == "server_error"


# ---- unexpected errors ----


def test_generic_exception_is_500_without_leaking_details(
    caplog: pytest.LogCaptureFixture,
) -> None:
    secret = "password=hunter2 at /srv/secret/path.py"
    with caplog.at_level(logging.ERROR, logger="gateway.openai.errors"):
        error = to_http_error(RuntimeError(secret))
    assert error.status == 500
    body = body_of(error)
    assert body["type"] == "server_error"
    assert "hunter2" not in body["message"] and "secret" not in body["message"]
    assert "RuntimeError" not in body["message"]
    assert error.headers is None
    # It is logged for the operator instead.
    assert any(r.exc_info and r.exc_info[1] is not None for r in caplog.records)


@pytest.mark.parametrize("exc", [KeyError("k"), ValueError("v"), ZeroDivisionError()])
def test_any_unexpected_exception_is_500(exc: Exception) -> None:
    assert to_http_error(exc).status == 500


# ---- request validation ----


def test_validation_error_names_the_parameter() -> None:
    exc = validation_error(
        {
            "type": "less_than_equal",
            "loc": ("body", "temperature"),
            "msg": "Input should be less than or equal to 2",
            "input": 5,
        }
    )
    error = to_http_error(exc)
    assert error.status == 400
    body = body_of(error)
    assert body["param"] == "temperature"
    assert body["type"] == "invalid_request_error"
    assert "less than or equal to 2" in body["message"]
    assert "temperature" in body["message"]


def test_validation_error_nested_location_is_dotted() -> None:
    exc = validation_error(
        {
            "type": "missing",
            "loc": ("body", "messages", 0, "role"),
            "msg": "Field required",
            "input": {},
        }
    )
    body = body_of(to_http_error(exc))
    assert body["param"] == "messages.0.role"


def test_validation_error_reports_the_first_error() -> None:
    exc = validation_error(
        {"type": "missing", "loc": ("body", "model"), "msg": "Field required", "input": {}},
        {"type": "missing", "loc": ("body", "messages"), "msg": "Field required", "input": {}},
    )
    assert body_of(to_http_error(exc))["param"] == "model"


def test_a_validators_message_loses_pydantics_prefix() -> None:
    exc = validation_error(
        {
            "type": "value_error",
            "loc": ("body", "stop"),
            "msg": "Value error, a stop sequence may have at most 256 characters",
            "input": "x" * 257,
        }
    )
    body = body_of(to_http_error(exc))
    assert body["message"] == "stop: a stop sequence may have at most 256 characters"
    assert body["param"] == "stop"


def test_invalid_json_body() -> None:
    exc = validation_error(
        {
            "type": "json_invalid",
            "loc": ("body", 12),
            "msg": "JSON decode error",
            "input": {},
            "ctx": {"error": "Expecting value"},
        }
    )
    error = to_http_error(exc)
    assert error.status == 400
    body = body_of(error)
    assert body["message"] == (
        "We could not parse the JSON body of your request. The API expects a JSON object, "
        "but what was sent was not valid JSON (Expecting value at character 12)."
    )
    assert body["type"] == "invalid_request_error"
    assert body["param"] is None


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ([1, 2], "The request body must be a JSON object, not an array."),
        ("hi", "The request body must be a JSON object, not a string."),
        (3.5, "The request body must be a JSON object, not a number."),
        (True, "The request body must be a JSON object, not a boolean."),
        (None, "The request body must be a JSON object, not null."),
        (
            b"Once upon a time",  # what FastAPI passes on when the body was not sent as JSON
            "The request body must be a JSON object, sent with Content-Type: application/json.",
        ),
    ],
    ids=["array", "string", "number", "boolean", "null", "not-sent-as-json"],
)
def test_a_body_that_is_not_an_object_is_named_as_such(given: object, message: str) -> None:
    exc = validation_error(
        {
            "type": "model_attributes_type",
            "loc": ("body",),
            "msg": "Input should be a valid dictionary or object to extract fields from",
            "input": given,
        }
    )
    error = to_http_error(exc)
    assert error.status == 400
    assert body_of(error) == {
        "message": message,
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }


def test_a_missing_body_is_named_as_such() -> None:
    exc = validation_error({"type": "missing", "loc": ("body",), "msg": "Field required"})
    body = body_of(to_http_error(exc))
    assert body["message"] == "The request body is empty; it must be a JSON object."
    assert body["param"] is None


def test_a_validator_of_the_whole_body_keeps_its_message() -> None:
    exc = validation_error(
        {"type": "value_error", "loc": ("body",), "msg": "Value error, give a or b", "input": {}}
    )
    body = body_of(to_http_error(exc))
    assert (body["message"], body["param"]) == ("give a or b", None)


def test_validation_error_without_details() -> None:
    error = to_http_error(validation_error())
    assert error.status == 400
    assert body_of(error)["message"]
