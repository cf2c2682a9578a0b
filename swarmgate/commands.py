"""What each `swarmgate` subcommand does once its arguments are parsed."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

from gateway.web.auth import ApiKeys, KeyFileError, is_loopback, read_key_lines
from models.devices import Placement
from models.resolve import ModelSource, ModelSourceError, resolve_model
from protocol.credentials import Role
from protocol.membership import Membership, SwarmKey, SwarmKeyError
from routing.snapshot import SwarmSnapshot
from swarm_dht.dht import SwarmDHT
from swarmgate.bootstrap import resolve_initial_peers, serve_maddrs
from swarmgate.flags import settings_values
from swarmgate.options import FLAGS

logger = logging.getLogger("swarmgate")


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()


def membership(args: argparse.Namespace, role: Role) -> Membership | None:
    """What ``--swarm-key`` (the swarm key, or a credential issued from it) makes this
    process, acting as ``role``; a bad file ends the command with a clear message."""
    if not args.swarm_key:
        return None
    try:
        return Membership.load(args.swarm_key, role)
    except SwarmKeyError as e:
        raise SystemExit(f"swarmgate: {e}") from None


def keygen(args: argparse.Namespace) -> int:
    key = SwarmKey.generate()
    try:
        key.save(args.file)
    except FileExistsError:
        raise SystemExit(f"swarmgate: {args.file} exists; not overwriting a key") from None
    except OSError as e:
        raise SystemExit(f"swarmgate: cannot write {args.file}: {e.strerror}") from None
    print(
        f"swarmgate keygen: wrote the swarm key {key.fingerprint} to {args.file} (mode 600).\n"
        "Keep it offline and issue each process a credential for its role "
        "(`swarmgate issue --swarm-key FILE --role server|gateway|finetune --days N OUT`), or, "
        "in a small swarm you run alone, give the key itself to every process (--swarm-key "
        "FILE or SWARMGATE_SWARM_KEY=FILE): whoever holds it is a member, with every role."
    )
    return 0


def initial_peers(args: argparse.Namespace) -> list[str]:
    return resolve_initial_peers(args.initial_peers, args.join_timeout)


@contextlib.contextmanager
def model_errors(role: str) -> Iterator[None]:
    """A model that cannot be had (Hub refusal, unknown model or revision, not cached
    offline, no disk) ends the command with its one-line message, not a traceback."""
    try:
        yield
    except (ModelSourceError, FileNotFoundError) as e:
        raise SystemExit(f"swarmgate {role}: {e}") from None


def model_source(args: argparse.Namespace, role: str) -> ModelSource:
    """The model ``--model`` (at ``--revision``) names."""
    with model_errors(role):
        return resolve_model(args.model, name=args.model_name, revision=args.revision)


def dht(args: argparse.Namespace) -> None:
    peer = SwarmDHT(
        initial_peers=initial_peers(args),
        host_maddrs=args.host_maddrs,
        announce_maddrs=args.announce_maddrs or None,
        identity_path=args.identity,
        start=True,
        membership=membership(args, Role.SERVER),
    )
    try:
        visible = [str(m) for m in peer.get_visible_maddrs()]
        if args.http_port is not None:
            about = {"peer_id": peer.peer_id.to_base58(), "maddrs": visible}
            serve_maddrs(args.http_host, args.http_port, lambda: about)
        print(f"swarmgate dht: running as {peer.peer_id}", flush=True)
        print(f"swarmgate dht: connect with --initial-peers {' '.join(visible)}", flush=True)
        _wait_for_signal()
    finally:
        peer.shutdown()


def node(args: argparse.Namespace) -> None:
    from swarm_node.node import run_node
    from swarm_node.settings import NodeSettings

    values = settings_values(NodeSettings, FLAGS, args)
    values.update(
        initial_peers=tuple(initial_peers(args)), membership=membership(args, Role.SERVER)
    )
    run_node(NodeSettings(**values))


def gateway(args: argparse.Namespace) -> None:
    import uvicorn

    from gateway.app import create_app
    from gateway.settings import GatewaySettings

    keys = read_api_keys(args.api_key, args.api_key_file, "gateway")
    check_exposure("gateway", args.host, keys.keys, args.allow_open)
    source = model_source(args, "gateway")
    Placement.of(args.device, args.dtype)  # a device this machine lacks: a clear exit now
    with model_errors("gateway"):
        source.fetch_head()
    values = settings_values(GatewaySettings, FLAGS, args)
    values.update(
        model_id=source.name,
        model_path=source.path,
        model_revision=source.revision or "",
        draft_model=draft_model(args, source, "gateway"),
        initial_peers=tuple(initial_peers(args)),
        membership=membership(args, Role.GATEWAY),
        api_keys=keys.keys,
        key_limits=keys.limits,
    )
    settings = GatewaySettings(**values)
    # log_config=None: uvicorn's loggers go through the root handler (--log-format).
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_config=None)


def draft_model(args: argparse.Namespace, served: ModelSource, role: str) -> str | None:
    """The folder of the draft model ``--speculate draft`` runs, made local now: without
    one, or with one that cannot be had or does not share the served model's tokenizer,
    the command ends before anything starts."""
    if args.speculate != "draft":
        return None
    if not args.draft_model:
        raise SystemExit(
            f"swarmgate {role}: --speculate draft needs --draft-model MODEL (a small model "
            "sharing the served model's tokenizer, e.g. smollm2 over a bigger model of its "
            "family)"
        )
    from gateway.engine.draft_model import check_vocabulary
    from models.loading import load_tokenizer

    with model_errors(role):
        draft = resolve_model(args.draft_model)
        draft.fetch_whole()
    try:
        check_vocabulary(load_tokenizer(draft.path), load_tokenizer(served.path), args.draft_model)
    except ValueError as e:
        raise SystemExit(f"swarmgate {role}: {e}") from None
    return str(draft.path)


def api_keys(keys: list[str], key_file: str | None) -> tuple[str, ...]:
    """Keys from flags and from a file (see ``read_api_keys``)."""
    return read_api_keys(keys, key_file).keys


def read_api_keys(keys: list[str], key_file: str | None, role: str = "gateway") -> ApiKeys:
    """Keys from flags and from a file: one per line, optionally with settings of its own
    (``KEY max_concurrent=8``); blank lines and # comments skipped. A file that cannot be
    read ends the command with one line, which never shows a key."""
    found = [k.strip() for k in keys if k.strip()]
    if not key_file:
        return ApiKeys(tuple(found))
    try:
        mode = Path(key_file).stat().st_mode
        if mode & stat.S_IROTH:
            logger.warning(
                "the API key file %s can be read by every user of this machine (mode %03o); "
                "`chmod 600` it",
                key_file,
                stat.S_IMODE(mode),
            )
        from_file = read_key_lines(Path(key_file).read_text().splitlines())
    except OSError as e:
        raise SystemExit(f"swarmgate {role}: --api-key-file {key_file}: {e.strerror}") from None
    except KeyFileError as e:
        raise SystemExit(f"swarmgate {role}: --api-key-file {key_file}: {e}") from None
    merged = tuple(dict.fromkeys([*found, *from_file.keys]))
    return ApiKeys(merged, from_file.limits)


def check_exposure(role: str, host: str, keys: tuple[str, ...], allow_open: bool) -> None:
    """A gateway that anyone on the network could use must be asked for: on an address
    other than loopback, it needs API keys or ``--allow-open``."""
    if keys or allow_open or is_loopback(host):
        return
    raise SystemExit(
        f"swarmgate {role}: refusing to serve the API on {host} without API keys: anyone who "
        "reaches that address could use the model. Set API keys (--api-key-file FILE or "
        "SWARMGATE_API_KEY), or pass --allow-open (SWARMGATE_ALLOW_OPEN=1) to serve it open "
        "on purpose"
    )


def status(args: argparse.Namespace) -> int:
    from swarm_dht.discovery import fetch_models, fetch_snapshot
    from swarmgate.status import format_table, summarize

    client = SwarmDHT(
        initial_peers=initial_peers(args),
        client_mode=True,
        start=True,
        membership=membership(args, Role.GATEWAY),
    )

    async def read() -> list[SwarmSnapshot]:
        models = await fetch_models(client, args.namespace)
        return [await fetch_snapshot(client, prefix, m) for prefix, m in models.items()]

    try:
        snapshots = asyncio.run(read())
    finally:
        client.shutdown()
    if args.json:
        print(json.dumps([summarize(s) for s in snapshots], indent=2))
    else:
        print(format_table(snapshots))
    return 0 if snapshots else 1


def up(args: argparse.Namespace) -> int:
    from swarmgate.local_swarm import LocalSwarm

    keys = read_api_keys(args.api_key, args.api_key_file, "up")
    check_exposure("up", args.host, keys.keys, args.allow_open)
    source = model_source(args, "up")
    Placement.of(args.device, args.dtype)
    draft_model(args, source, "up")  # its gateway would refuse it only once the nodes run
    swarm = LocalSwarm(source, args)
    return swarm.run()


def finetune(args: argparse.Namespace) -> int:
    from models.loading import block_linears, load_config
    from protocol.rpc import MAX_LORA_RANK
    from training.data import DataError
    from training.lora import parse_targets
    from training.settings import FinetuneSettings
    from training.trainer import train_lora

    source = model_source(args, "finetune")
    Placement.of(args.device, args.dtype)
    with model_errors("finetune"):
        source.fetch_head()
    if args.rank > MAX_LORA_RANK:
        raise SystemExit(
            f"swarmgate finetune: --rank {args.rank}: servers take at most {MAX_LORA_RANK}"
        )
    try:
        targets = parse_targets(args.targets, list(block_linears(load_config(source.path))))
    except ValueError as e:
        raise SystemExit(f"swarmgate finetune: --targets: {e}") from None
    values = settings_values(FinetuneSettings, FLAGS, args)
    values.update(
        model_name=source.name,
        model_path=source.path,
        model_revision=source.revision or "",
        initial_peers=tuple(initial_peers(args)),
        targets=tuple(targets),
        membership=membership(args, Role.FINETUNE),
    )
    settings = FinetuneSettings(**values)
    try:
        train_lora(settings)
    except DataError as e:
        raise SystemExit(f"swarmgate finetune: {e}") from None
    return 0
