"""Cost of fine-tuning through a swarm: seconds and bytes per training step.

Starts a DHT and ``--nodes`` servers splitting the model's blocks evenly (``swarmgate dht``
and ``swarmgate node`` processes on loopback, open swarm), runs ``train_lora`` for a few
steps on a toy dataset and prints one JSON object: seconds per step (the first step,
which warms up, excluded), bytes sent and received per step (over all hops, forward and
backward), and the loss of the first and last steps.

With ``--initial-peers`` (and ``--model-name``, the model's id there) it trains through a
swarm that is already running instead.

    python bench/finetune.py --model smollm2 --batch-size 4 --length 64 --rank 8 [--record]
                             [--initial-peers ADDR ... --model-name ID]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import add_record_flag, finish
from models.loading import load_config
from models.resolve import resolve_model
from protocol.credentials import Role
from protocol.membership import Membership
from tests.processes import Process, no_orphans, stop_all, wait_for
from training.settings import FinetuneSettings
from training.trainer import train_lora


def toy_data(folder: Path, length: int) -> Path:
    """Records of about ``length`` tokens, each answered with one fixed word."""
    path = folder / "train.jsonl"
    filler = " ".join(["question"] * max(1, (length - 12) // 2))
    lines = [
        json.dumps({"prompt": f"Q{i}: {filler}?\nA:", "completion": " banana"}) for i in range(32)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def membership() -> Membership | None:
    """The nodes inherit ``SWARMGATE_SWARM_KEY`` from this process's environment, if set
    (then their swarm is closed): the fine-tuner joins it with the same key."""
    key = os.environ.get("SWARMGATE_SWARM_KEY")
    return Membership.load(key, Role.FINETUNE) if key else None


@contextlib.contextmanager
def swarm_peers(args: argparse.Namespace, folder: Path) -> Iterator[list[str]]:
    """The DHT to train through: ``--initial-peers`` as given, else a DHT and ``--nodes``
    servers splitting the model's blocks evenly, started here and stopped on exit."""
    if args.initial_peers:
        yield args.initial_peers
        return
    blocks = load_config(resolve_model(args.model).path).num_hidden_layers
    cuts = [round(i * blocks / args.nodes) for i in range(args.nodes + 1)]
    with no_orphans():
        dht = Process("dht", ["dht"], folder)
        processes = [dht]
        try:
            wait_for(lambda: "--initial-peers" in dht.output(), 60, "the DHT")
            line = next(ln for ln in dht.output().splitlines() if "--initial-peers" in ln)
            peers = line.split("--initial-peers", 1)[1].split()
            for start, end in itertools.pairwise(cuts):
                argv = ["node", "--model", args.model, "--initial-peers", *peers]
                argv += ["--blocks", f"{start}:{end}", "--announce-period", "2"]
                processes.append(Process(f"node {start}:{end}", argv, folder))
            for node in processes[1:]:
                wait_for(lambda n=node: "serving blocks" in n.output(), 300, node.name)
            yield peers
        finally:
            stop_all(processes)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    add_record_flag(parser)
    parser.add_argument(
        "--initial-peers",
        nargs="+",
        help="train through this running swarm (its DHT's multiaddrs) instead of starting one",
    )
    parser.add_argument("--model-name", help="the model's id in that swarm")
    args = parser.parse_args(argv)
    source = resolve_model(args.model)
    with tempfile.TemporaryDirectory() as tmp, swarm_peers(args, Path(tmp)) as peers:
        folder = Path(tmp)
        settings = FinetuneSettings(
            model_name=args.model_name or source.name,
            model_path=source.path,
            initial_peers=tuple(peers),
            data=toy_data(folder, args.length),
            out=folder / "adapter",
            rank=args.rank,
            alpha=2 * args.rank,
            targets=tuple(args.targets.split(",")),
            steps=args.steps,
            batch_size=args.batch_size,
            max_length=args.length,
            membership=membership(),
        )
        progress = io.StringIO()
        began = time.monotonic()
        result = train_lora(settings, progress=progress)
        wall = time.monotonic() - began
    lines = [ln for ln in progress.getvalue().splitlines() if ln.startswith("step ")]
    step_seconds = [float(ln.split("  ")[2].split()[0]) for ln in lines]
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "model": source.name,
        "nodes": None if args.initial_peers else args.nodes,
        "batch_size": args.batch_size,
        "length": args.length,
        "rank": args.rank,
        "targets": args.targets,
        "steps": args.steps,
        "seconds_per_step": sum(step_seconds[1:]) / max(1, len(step_seconds) - 1),
        "first_step_s": step_seconds[0],
        "bytes_sent_per_step": result.bytes_sent_per_step,
        "bytes_received_per_step": result.bytes_received_per_step,
        "loss_first": result.losses[0],
        "loss_last": result.losses[-1],
        "wall_s": wall,
    }
    finish("finetune", report, args)
    return report


if __name__ == "__main__":
    main()
