"""Bootstrap peers found by URL: a DHT serves its multiaddrs, others fetch them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from swarmgate import bootstrap
from swarmgate.bootstrap import resolve_initial_peers, serve_maddrs
from tests.processes import free_port

MADDR = "/ip4/127.0.0.1/tcp/31337/p2p/12D3KooWExample"


@contextmanager
def bootstrap_peer(describe: Callable[[], object]) -> Iterator[str]:
    """A `swarmgate dht --http-port` stand-in on a free loopback port; its URL."""
    port = free_port()
    server = serve_maddrs("127.0.0.1", port, describe)  # type: ignore[arg-type]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.shutdown()
        server.server_close()


def test_urls_are_replaced_by_the_multiaddrs_their_peer_serves() -> None:
    with bootstrap_peer(lambda: {"peer_id": "12D3KooWExample", "maddrs": [MADDR]}) as url:
        given = ["/ip4/10.0.0.9/tcp/1/p2p/12D3KooWOther", url]
        assert resolve_initial_peers(given, timeout_s=10) == [given[0], MADDR]


def test_a_silent_peer_is_skipped_once_another_answered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(bootstrap, "GRACE_S", 0.0)
    monkeypatch.setattr(bootstrap, "RETRY_EVERY_S", 0.01)
    silent = f"http://127.0.0.1:{free_port()}"
    with bootstrap_peer(lambda: {"maddrs": [MADDR]}) as url:
        assert resolve_initial_peers([silent, url], timeout_s=30) == [MADDR]


def test_nobody_answering_ends_with_a_clear_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bootstrap, "RETRY_EVERY_S", 0.01)
    silent = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(SystemExit, match="none of the bootstrap peers answered"):
        resolve_initial_peers([silent], timeout_s=0.2)


@pytest.mark.parametrize(
    "reply", [{"maddrs": []}, {"maddrs": "x"}, {"maddrs": ["x" * 600]}, ["not", "a", "dict"]]
)
def test_unusable_replies_are_refused(reply: object, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bootstrap, "RETRY_EVERY_S", 0.01)
    with bootstrap_peer(lambda: reply) as url, pytest.raises(SystemExit):
        resolve_initial_peers([url], timeout_s=0.2)
