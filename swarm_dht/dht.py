"""The hivemind DHT process, made to die when asked.

hivemind forks the DHT into a child process that inherits the parent's Python signal
handlers (asyncio's, uvicorn's, ours). Those only set flags in the parent, so a SIGTERM
sent to the child did nothing: a DHT whose graceful shutdown failed (its p2pd already gone
after a Ctrl-C to the process group) lived on forever, and its parent hung at exit joining
it. Here the child restores a SIGTERM that ends it with its p2pd, and dies with its parent.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
from types import FrameType
from typing import Any

import psutil
from hivemind import DHT
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.validation import RecordValidatorBase
from hivemind.utils.crypto import RSAPrivateKey

from protocol.membership import Membership, SwarmAuthorizer
from swarm_dht.revocations import RevocationValidator

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask Linux to send ``sig`` to this process when its parent exits (PR_SET_PDEATHSIG)."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, sig)


def _exit_with_children(signum: int, frame: FrameType | None) -> None:
    for child in psutil.Process().children(recursive=True):  # p2pd
        with contextlib.suppress(psutil.Error):
            child.terminate()
    os._exit(0)


class SwarmJoinError(RuntimeError):
    """This process could not reach any member through its initial peers."""


class SwarmDHT(DHT):  # type: ignore[misc]
    """``hivemind.DHT`` whose process stops on SIGTERM and when its parent dies, closed to
    everyone without a credential of the swarm when ``membership`` is given.

    Records whose subkey ends in ``owner_tag`` can be changed only by this process: hivemind's
    ``RSASignatureValidator`` signs them with its holder key (the one its credential names,
    so gateways can tell a server's records from anyone else's) and every peer checks that.
    """

    def __init__(self, *args: Any, membership: Membership | None = None, **kwargs: Any) -> None:
        validators: list[RecordValidatorBase] = []
        if membership is None:
            logger.warning(
                "no swarm key: this is an open swarm that anyone who reaches its peers can "
                "join (make a key with `swarmgate keygen FILE`, pass it with --swarm-key)"
            )
            owner = RSASignatureValidator(RSAPrivateKey())
        else:
            credential = membership.credential()
            logger.info(
                "closed swarm %s: members only; this process holds a %s",
                membership.fingerprint,
                credential.describe(),
            )
            owner = RSASignatureValidator(membership.holder)
            validators.append(RevocationValidator(membership))
            kwargs["authorizer"] = SwarmAuthorizer(membership)
            if not membership.role.announces:
                # hivemind copies what a read found to the nearest peers; members refuse
                # stores by anyone but a server, so a gateway must not try.
                kwargs.setdefault("cache_nearest", 0)
        self.owner_tag: str = owner.local_public_key.decode()
        try:
            super().__init__(*args, record_validators=[owner, *validators], **kwargs)
        except RuntimeError as e:
            if "bootstrap failed" not in str(e):
                raise
            raise SwarmJoinError(
                "none of the initial peers answered: check their addresses and, if the swarm "
                "is closed, that this process was given its key or a credential (--swarm-key)"
            ) from None

    def run(self) -> None:  # runs in the forked child
        signal.set_wakeup_fd(-1)  # the parent's event loop owns that fd, not us
        signal.signal(signal.SIGTERM, _exit_with_children)
        die_with_parent()
        super().run()
