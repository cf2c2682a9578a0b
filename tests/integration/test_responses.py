"""A Responses conversation goes on from another gateway, on the servers that cache it."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from tests.integration.conftest import Swarm, running_gateway
from tests.integration.test_swarm_chat import _reference, hf_greedy
from tests.processes import RedisServer

pytestmark = pytest.mark.integration

MAX_TOKENS = 8
INSTRUCTIONS = "You describe places to travellers."


def test_previous_response_id_continues_on_another_gateway_sharing_redis(
    swarm: Swarm, tmp_path: Path
) -> None:
    redis = RedisServer()
    redis.start()
    try:
        flags = ("--redis-url", redis.url)
        with (
            running_gateway(swarm, tmp_path, *flags, name="responses-a") as a,
            running_gateway(swarm, tmp_path, *flags, name="responses-b") as b,
        ):
            sdk_a, sdk_b = (
                openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0) for url in (a, b)
            )
            common = {
                "model": swarm.model_id,
                "instructions": INSTRUCTIONS,
                "max_output_tokens": MAX_TOKENS,
                "temperature": 0,
            }
            question = "Describe a quiet harbour at dawn. " * 4
            first = sdk_a.responses.create(input=question, **common)
            follow = sdk_b.responses.create(
                input="Now at night.", previous_response_id=first.id, **common
            )
            assert first.usage.input_tokens_details.cached_tokens == 0
            # The follow-up, on the other gateway, found the conversation in Redis and its
            # session on the servers: only what is new was computed.
            assert follow.usage.input_tokens_details.cached_tokens > first.usage.input_tokens // 2

            # And it is exact: what the whole model answers to the whole conversation.
            conversation = [
                {"role": "system", "content": INSTRUCTIONS},
                {"role": "user", "content": question},
                {"role": "assistant", "content": first.output_text},
                {"role": "user", "content": "Now at night."},
            ]
            prompt, expected = hf_greedy(swarm.model_path, conversation, MAX_TOKENS)
            tokenizer = _reference(swarm.model_path)[1]
            assert follow.usage.input_tokens == len(prompt)
            assert follow.output_text == tokenizer.decode(expected, skip_special_tokens=True)

            assert sdk_a.responses.retrieve(follow.id) == follow  # stored by the other one
    finally:
        redis.stop()
