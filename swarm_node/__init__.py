"""A block server: serves a span of a model's transformer blocks to the swarm."""
