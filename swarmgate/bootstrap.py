"""Finding a swarm's bootstrap peers by name, where peer ids are not known in advance.

A bootstrap ``swarmgate dht --http-port P`` tells anyone who asks its multiaddrs (peer id
included) at ``GET /maddrs``. Other processes may then list ``http://HOST:P`` among their
``--initial-peers``: a Kubernetes headless Service name, say, in place of an address whose
peer id changes with the pod's key. Joining still takes the swarm key: the address is
public knowledge, membership is not.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx

logger = logging.getLogger(__name__)

MAX_REPLY_BYTES = 64 * 1024
MAX_MADDRS = 64  # per bootstrap peer
MAX_MADDR_CHARS = 512
RETRY_EVERY_S = 2.0
GRACE_S = 10.0  # once one bootstrap peer answered, how long to wait for the others


def serve_maddrs(
    host: str, port: int, describe: Callable[[], dict[str, object]]
) -> ThreadingHTTPServer:
    """Answer ``GET /maddrs`` and ``GET /health`` with ``describe()`` from a daemon thread,
    until the returned server is ``shutdown()``."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path not in ("/maddrs", "/health"):
                self.send_error(404)
                return
            body = json.dumps(describe()).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # probes every few seconds would fill the log

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True, name="maddrs-http").start()
    return server


def resolve_initial_peers(entries: Sequence[str], timeout_s: float) -> list[str]:
    """``entries`` with every ``http(s)://`` one replaced by the multiaddrs it serves.

    Bootstrap peers may start after us (a whole swarm deployed at once): URLs are retried
    until all answer, or ``GRACE_S`` after the first one did (one suffices to join), or
    ``timeout_s`` passes. Those still silent are skipped with a warning; if nothing at all
    is left, ``SystemExit``.
    """
    urls = [e for e in entries if e.startswith(("http://", "https://"))]
    maddrs = [e for e in entries if e not in urls]
    if not urls:
        return maddrs
    deadline = time.monotonic() + timeout_s
    first_answer: float | None = None
    found: dict[str, list[str]] = {}
    while True:
        for url in urls:
            if url not in found:
                try:
                    found[url] = _fetch(url)
                    first_answer = first_answer or time.monotonic()
                except (httpx.HTTPError, ValueError) as e:
                    logger.info("bootstrap peer %s not answering yet: %s", url, e)
        now = time.monotonic()
        if len(found) == len(urls) or now >= deadline:
            break
        if first_answer is not None and now >= first_answer + GRACE_S:
            break
        time.sleep(RETRY_EVERY_S)
    for url in urls:
        if url not in found:
            logger.warning("bootstrap peer %s did not answer; joining without it", url)
    resolved = maddrs + [m for url in urls for m in found.get(url, [])]
    if not resolved:
        raise SystemExit(
            f"swarmgate: none of the bootstrap peers answered within {timeout_s:.0f} s: "
            + " ".join(urls)
        )
    return resolved


def _fetch(url: str) -> list[str]:
    with httpx.stream("GET", url.rstrip("/") + "/maddrs", timeout=5.0) as response:
        response.raise_for_status()
        body = b""
        for chunk in response.iter_bytes():
            body += chunk
            if len(body) > MAX_REPLY_BYTES:
                raise ValueError(f"the reply of {url} exceeds {MAX_REPLY_BYTES} bytes")
    reply = json.loads(body)
    maddrs = reply.get("maddrs") if isinstance(reply, dict) else None
    if (
        not isinstance(maddrs, list)
        or not 0 < len(maddrs) <= MAX_MADDRS
        or not all(isinstance(m, str) and 0 < len(m) <= MAX_MADDR_CHARS for m in maddrs)
    ):
        raise ValueError(f"{url} sent no usable multiaddrs")
    return maddrs
