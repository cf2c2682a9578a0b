"""Why a generation stopped. The engine decides it; every endpoint reports it as it is (the
OpenAI API's words, which the Responses API maps onto its own statuses)."""

from typing import Literal

FinishReason = Literal["stop", "length", "tool_calls"]
