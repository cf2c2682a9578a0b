"""The swarm client: how a process that is not a server uses the swarm.

It reads the swarm (``swarm_client``), plans and opens chains of servers (``chain``,
``hop_stream``, ``frames``) and tells hung servers from slow ones (``liveness``). The gateway
and the fine-tuner both stand on it; it imports neither.
"""
