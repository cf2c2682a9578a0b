"""A broken block server for tests: the real `swarmgate` CLI whose steps answer garbage.

    python -m tests.fake_node node --model ... --blocks 2:4 ...   (FAKE_NODE_FAULT=nan|dtype)

``nan``: every hidden state it returns is NaN. ``dtype``: it returns bfloat16 instead of the
float32 the protocol promises. It announces itself and opens sessions like a healthy node.
"""

from __future__ import annotations

import os

import torch

from swarm_node import handler as handler_module
from swarm_node.inference_stream import InferenceStreams
from swarmgate.cli import main


class FaultyStreams(InferenceStreams):
    async def _step(self, *args: object, **kwargs: object) -> torch.Tensor:
        out = await super()._step(*args, **kwargs)  # type: ignore[arg-type]
        if os.environ.get("FAKE_NODE_FAULT", "nan") == "dtype":
            return out.to(torch.bfloat16)
        return torch.full_like(out, float("nan"))


if __name__ == "__main__":
    handler_module.InferenceStreams = FaultyStreams  # type: ignore[attr-defined]
    main()
