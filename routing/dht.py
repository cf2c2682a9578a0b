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
import os
import signal
from types import FrameType

import psutil
from hivemind import DHT

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask Linux to send ``sig`` to this process when its parent exits (PR_SET_PDEATHSIG)."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, sig)


def _exit_with_children(signum: int, frame: FrameType | None) -> None:
    for child in psutil.Process().children(recursive=True):  # p2pd
        with contextlib.suppress(psutil.Error):
            child.terminate()
    os._exit(0)


class SwarmDHT(DHT):  # type: ignore[misc]
    """``hivemind.DHT`` whose process stops on SIGTERM and when its parent dies."""

    def run(self) -> None:  # runs in the forked child
        signal.set_wakeup_fd(-1)  # the parent's event loop owns that fd, not us
        signal.signal(signal.SIGTERM, _exit_with_children)
        die_with_parent()
        super().run()
