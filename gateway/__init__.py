"""The OpenAI-compatible HTTP gateway: a client of the swarm."""
