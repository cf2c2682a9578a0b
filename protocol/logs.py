"""Log lines that one request can be followed by, across machines.

The gateway names each request (``request_id``); the id travels to every server of its
chain in ``OpenSession``, and each process stamps it on the log records written while it
works on that request. ``--log-format json`` writes one JSON object per line, for log
collectors; ``text`` stays readable in a terminal.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time

# Set by the gateway for the duration of a request, by a node for one inference stream;
# asyncio copies it into every task those start.
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class RequestIdFilter(logging.Filter):
    """Stamps every record with the request being worked on ("" outside requests)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


# hivemind renames WARNING to WARN process-wide; collectors expect the standard names.
_LEVELS = {10: "DEBUG", 20: "INFO", 30: "WARNING", 40: "ERROR", 50: "CRITICAL"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": _LEVELS.get(record.levelno, record.levelname),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if getattr(record, "request_id", ""):
            entry["request_id"] = record.request_id  # type: ignore[attr-defined]
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        rid = getattr(record, "request_id", "")
        return f"{line} [request {rid}]" if rid else line


def configure_logging(level: str, fmt: str = "text") -> None:
    """Root logging for a swarmgate process: ``fmt`` is ``text`` or ``json``, on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else _TextFormatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # huggingface_hub's HTTP client logs every request of a download at INFO: one line per
    # shard and redirect says nothing the download's own progress does not.
    for noisy in ("httpx", "httpx2"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    if fmt == "json":  # hivemind formats its own loggers unless told to pass them on
        from hivemind.utils.logging import use_hivemind_log_handler

        use_hivemind_log_handler("nowhere")
