"""A full gateway refuses at once with 429 and Retry-After, and serves again when free."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import Swarm, running_gateway
from tests.processes import wait_for

pytestmark = pytest.mark.integration


def test_a_full_gateway_answers_429_with_retry_after(swarm: Swarm, tmp_path: Path) -> None:
    body = {
        "model": swarm.model_id,
        "messages": [{"role": "user", "content": "Go on."}],
        "max_tokens": 900,
        "temperature": 0,
    }
    flags = ("--max-concurrent", "1", "--max-queue", "0")
    with running_gateway(swarm, tmp_path, *flags, name="gateway-1slot") as url:
        # Banning end-of-sequence keeps the only slot busy for all 900 tokens.
        long = {**body, "stream": True, "logit_bias": {"2": -100}}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=long, timeout=60) as busy:
            lines = busy.iter_lines()  # kept: dropping it would close the stream
            assert next(lines).startswith("data: ")
            for _ in range(3):  # a bounded flood while the only slot is taken
                r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
                assert r.status_code == 429
                assert int(r.headers["retry-after"]) > 0
                assert r.json()["error"]["type"] == "rate_limit_error"
        short = {**body, "max_tokens": 2}
        wait_for(
            lambda: (
                httpx.post(f"{url}/v1/chat/completions", json=short, timeout=30).status_code == 200
            ),
            30,
            "the slot to free up",
        )
