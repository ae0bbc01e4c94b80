"""A non-blocking socket as a FramedStream transport, lean enough for the decode path: the data
plane's transport between processes of one host (a Unix socket, node/dataplane.py), and the base of
TlsTransport (node/wire/tls.py), which adds TLS for everything else.

The socket calls are the standard library's; this module only waits, through trio's low-level
readiness calls, when an operation would block. Every trio-level layer it skips costs time on a path
each decode step crosses once per server. Measured between two processes ping-ponging a 2.3 KB
STEP/OUTPUT over TLS on loopback (warm caches):

    trio.SocketStream + ssl.MemoryBIO, FramedStream with deadline scopes   414 us per round trip
    non-blocking SSLSocket, same FramedStream                              379 us
    non-blocking SSLSocket, lean frame reads (FramedStream's direct path)  267 us
    blocking SSLSocket, plain Python, no trio at all                       223 us

An operation that does not block returns without a trip through trio's run loop (a checkpoint);
so that a peer that keeps the socket busy cannot starve the other tasks, every CHECKPOINT_EVERY-th
such operation takes one, and every operation honours a pending cancellation at once.

One reader task and one writer task may use a transport at once (a FramedStream's recv and send):
writes are serialised by a lock.
"""

from __future__ import annotations

import select
import socket

import trio
from llmswarm.node.locks import QuickLock

CHECKPOINT_EVERY = 16


class SocketTransport:
    """read(n) / write(data) / close() / reset() over a connected stream socket `sock` (taken over:
    closed with the transport). `read_nowait`, `try_write` and `wait_readable` let a FramedStream
    skip the waits (and their deadline scopes) when no wait is needed."""

    kind = "Unix socket"  # what `chat --show-route` calls the path (the data plane's other one is TLS)

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._send_lock = QuickLock()
        self._read_wants_write = False  # the last read_nowait needs the socket writable, not readable
        self._quick = 0  # operations finished without a checkpoint since the last one
        self._closed = False
        self.done = trio.Event()  # closed or reset by its owner

    # -- reading -----------------------------------------------------------------------------------
    def read_nowait(self, n: int) -> bytes | None:
        """Up to `n` bytes that are here now; b"" at EOF; None when nothing is (then
        `wait_readable`). Socket errors are raised."""
        try:
            return self.sock.recv(n)
        except BlockingIOError:
            return None

    def has_input(self) -> bool:
        """Whether something (bytes, EOF, an error) has arrived to read: a poll, no wait, no read. For
        code that computes without yielding to trio (a draft working ahead) and wants to stop when a
        reply is here."""
        if self._closed:
            return True
        poll = select.poll()
        poll.register(self.sock, select.POLLIN)
        return bool(poll.poll(0))

    async def wait_readable(self) -> None:
        """Until read_nowait may return something (after it returned None)."""
        self._quick = 0
        if self._read_wants_write:
            async with self._send_lock:  # the writer may be waiting on the same socket
                await trio.lowlevel.wait_writable(self.sock)
        else:
            await trio.lowlevel.wait_readable(self.sock)

    async def read(self, n: int) -> bytes:
        """Up to `n` bytes; b"" at a clean close or at EOF."""
        while (data := self.read_nowait(n)) is None:
            await self.wait_readable()
        await self.quick_checkpoint()
        return data

    # -- writing -----------------------------------------------------------------------------------
    def _send(self, data: memoryview) -> int:
        """Send some of `data` now: how much (0 when the socket is full)."""
        try:
            return self.sock.send(data)
        except BlockingIOError:
            return 0

    def try_write(self, data: bytes | bytearray | memoryview) -> int:
        """Send what of `data` can go now, without a wait: how many bytes (all of them, normally).
        The rest, `data[sent:]`, must follow with `write` before anything else is written."""
        if self._send_lock.locked():
            return 0
        return self._send(memoryview(data))

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        async with self._send_lock:
            view = memoryview(data)
            while view.nbytes:
                view = view[self._send(view):]
                if view.nbytes:
                    self._quick = 0
                    await trio.lowlevel.wait_writable(self.sock)
        await self.quick_checkpoint()

    async def quick_checkpoint(self) -> None:
        """A pending cancellation now, and every CHECKPOINT_EVERY-th call a trip through the run loop."""
        self._quick += 1
        if self._quick >= CHECKPOINT_EVERY:
            self._quick = 0
            await trio.lowlevel.checkpoint()
        else:
            await trio.lowlevel.checkpoint_if_cancelled()

    # -- closing -----------------------------------------------------------------------------------
    async def close(self) -> None:
        """The connection, cleanly: the peer reads EOF."""
        await self.reset()

    async def reset(self) -> None:
        """The connection, now: the peer's read ends at once."""
        self.done.set()
        if not self._closed:
            self._closed = True
            trio.lowlevel.notify_closing(self.sock)  # our own waits on it end (ClosedResourceError)
            self.sock.close()
        await trio.lowlevel.checkpoint()
