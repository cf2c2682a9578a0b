"""The gateway's HTTP surface: the FastAPI routes, API keys, admission limits, request ids,
cancellation on disconnect, event streams and SSE framing, and the mapping of errors to HTTP."""
