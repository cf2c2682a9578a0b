"""swarmgate: serve a large language model from a swarm of machines behind an OpenAI API."""

__version__ = "0.1.0"
