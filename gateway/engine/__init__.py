"""The decode engine: generation over the swarm, the LM head and its greedy screen, sampling,
grammars, text (detokenizing and stops), micro-batching, sessions and affinity."""
