"""The server's shared-memory channels (`tsqp.wire.shm`), one per client that asked for one at HELLO.

A request taken from a channel is copied into the channel's private buffer first, so the client
cannot change it under the server's checks; from there it goes through the same `Server.handle`
as a ZeroMQ request. Channels whose client died are closed within `REAP_EVERY_S` (and logged).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import zmq

from tsqp.wire.shm import ATTACHED, DEFAULT_AREA_BYTES, DEFAULT_SPIN_US, Channel, Spinner, check_private_folder

log = logging.getLogger("tsqp.server")

REAP_EVERY_S = 0.25
ATTACH_WITHIN_S = 30.0  # an offer the client has not taken by then is withdrawn


class ShmHub:
    def __init__(self, folder: str | os.PathLike[str], socket: zmq.Socket, area_bytes: int = DEFAULT_AREA_BYTES,
                 spin_us: float = DEFAULT_SPIN_US) -> None:  # fmt: skip
        self.folder = check_private_folder(folder)
        self.area_bytes = area_bytes
        self.spinner = Spinner(spin_us / 1e6)
        self.channels: dict[str, Channel] = {}
        self.identities: dict[str, Any] = {}  # client key -> its ROUTER identity, for replies too large for its area
        self._private: dict[str, memoryview] = {}
        self.poller = zmq.Poller()
        self.poller.register(socket, zmq.POLLIN)
        self._next_reap = 0.0

    def offer(self, key: str, identity: Any) -> dict[str, Any]:
        """A new channel for client `key` (replacing its old one): what its HELLO reply tells it."""
        self.drop(key, "the client asked for a new one")
        channel = Channel.create(self.folder, self.area_bytes)
        self.channels[key] = channel
        self.identities[key] = identity
        self._private[key] = memoryview(bytearray(self.area_bytes))
        self.poller.register(channel.bell_in, zmq.POLLIN)
        return {"path": str(channel.path), "area_bytes": self.area_bytes}

    def ready(self) -> Iterator[tuple[str, Channel]]:
        for key, channel in self.channels.items():
            if not channel.busy and channel.incoming_seq() != channel.seq:
                yield key, channel

    def take(self, key: str, channel: Channel) -> list[memoryview]:
        """The posted request's frames, copied out of shared memory; `ProtocolError` if its frame table is bad."""
        channel.seq = channel.incoming_seq()
        channel.busy = True  # until its reply is posted: the private buffer holds its frames
        return channel.read(self._private[key])  # type: ignore[return-value]  # a request area is never OVER_ZMQ

    def _any_ready(self) -> bool:
        return any(True for _ in self.ready())

    def wait(self, timeout_ms: int, idle: Callable[[], None] | None = None) -> bool:
        """Spin on the channels for the budget (calling `idle` between looks), then block on the socket and every doorbell."""
        if self.spinner.wait_for(self._any_ready, idle):
            return True
        for channel in self.channels.values():
            channel.drain()
        if self._any_ready():
            return True
        return bool(self.poller.poll(timeout_ms))

    def reap(self) -> None:
        """Close the channels of clients that died (or never attached), at most every `REAP_EVERY_S`."""
        now = time.monotonic()
        if now < self._next_reap:
            return
        self._next_reap = now + REAP_EVERY_S
        for key, channel in list(self.channels.items()):
            if channel.buf[ATTACHED]:
                if not channel.peer_alive():
                    self.drop(key, "the client went away")
            elif now - channel.created > ATTACH_WITHIN_S:
                self.drop(key, "the client never attached")

    def drop(self, key: str, why: str) -> None:
        channel = self.channels.pop(key, None)
        if channel is None:
            return
        log.info("closed the shared-memory channel of client %s: %s", key, why, extra={"client": key})
        self.poller.unregister(channel.bell_in)
        self._private.pop(key, None)
        self.identities.pop(key, None)
        channel.close()
        channel.unlink()

    def close(self) -> None:
        for key in list(self.channels):
            self.drop(key, "the server stops")
