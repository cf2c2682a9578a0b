"""Log lines carry the request they belong to, as text or as JSON objects."""

from __future__ import annotations

import json
import logging

import pytest

from protocol.logs import JsonFormatter, RequestIdFilter, _TextFormatter, request_id


def _record(message: str, *args: object) -> logging.LogRecord:
    record = logging.LogRecord("swarmgate.test", logging.WARNING, __file__, 1, message, args, None)
    RequestIdFilter().filter(record)
    return record


def test_json_lines_carry_the_request_id_of_their_context() -> None:
    token = request_id.set("req-42")
    try:
        line = JsonFormatter().format(_record("server %s failed", "Qm1"))
    finally:
        request_id.reset(token)
    entry = json.loads(line)
    assert entry["request_id"] == "req-42" and entry["message"] == "server Qm1 failed"
    assert entry["level"] == "WARNING" and entry["time"].endswith("Z")
    outside = json.loads(JsonFormatter().format(_record("idle")))
    assert "request_id" not in outside


def test_an_exception_stays_inside_one_json_line() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = _record("failed")
        record.exc_info = __import__("sys").exc_info()
    line = JsonFormatter().format(record)
    assert "\n" not in line and "ValueError: boom" in json.loads(line)["exception"]


@pytest.mark.parametrize(("rid", "suffix"), [("abc", " [request abc]"), ("", "")])
def test_text_lines_name_the_request_at_their_end(rid: str, suffix: str) -> None:
    token = request_id.set(rid)
    try:
        line = _TextFormatter("%(message)s").format(_record("hello"))
    finally:
        request_id.reset(token)
    assert line == "hello" + suffix
