"""TLS over one TCP connection, lean enough for the decode path: the data plane's transport
(node/dataplane.py).

The standard library's `ssl.SSLSocket`, non-blocking, does the TLS and the socket calls in C; this
module only waits, through trio's low-level readiness calls, when an operation would block. Every
trio-level layer it skips costs time on a path each decode step crosses once per server. Measured
between two processes ping-ponging a 2.3 KB STEP/OUTPUT over TLS on loopback (warm caches):

    trio.SocketStream + ssl.MemoryBIO, FramedStream with deadline scopes   414 us per round trip
    non-blocking SSLSocket, same FramedStream                              379 us
    non-blocking SSLSocket, lean frame reads (FramedStream's direct path)  267 us
    blocking SSLSocket, plain Python, no trio at all                       223 us

An operation that does not block returns without a trip through trio's run loop (a checkpoint);
so that a peer that keeps the socket busy cannot starve the other tasks, every CHECKPOINT_EVERY-th
such operation takes one, and every operation honours a pending cancellation at once.

One reader task and one writer task may use a transport at once (a FramedStream's recv and send):
writes are serialised by a lock, and OpenSSL is only ever called from trio's one thread.
"""

from __future__ import annotations

import socket
import ssl

import trio
from llmswarm.node.locks import QuickLock

CHECKPOINT_EVERY = 16


class TlsTransport:
    """read(n) / write(data) / close() / reset() over TLS on a connected TCP socket `sock` (taken
    over: closed with the transport), after `handshake()`. `read_nowait`, `try_write` and
    `wait_readable` let a FramedStream skip the waits (and their deadline scopes) when no wait is
    needed."""

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext, *, server_side: bool) -> None:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = ctx.wrap_socket(sock, server_side=server_side, do_handshake_on_connect=False)
        self._send_lock = QuickLock()
        self._read_wants_write = False  # the last read_nowait needs the socket writable, not readable
        self._quick = 0  # operations finished without a checkpoint since the last one
        self._closed = False
        self.done = trio.Event()  # closed or reset by its owner

    def peer_certificate(self) -> bytes:
        """The peer's certificate, DER (empty when it sent none)."""
        return self.sock.getpeercert(binary_form=True) or b""

    async def handshake(self) -> None:
        while True:
            try:
                self.sock.do_handshake()
                return
            except ssl.SSLWantReadError:
                await trio.lowlevel.wait_readable(self.sock)
            except ssl.SSLWantWriteError:
                await trio.lowlevel.wait_writable(self.sock)

    # -- reading -----------------------------------------------------------------------------------
    def read_nowait(self, n: int) -> bytes | None:
        """Up to `n` bytes of plaintext that are here now; b"" at a clean close or EOF; None when
        nothing is (then `wait_readable`). Socket and TLS errors are raised."""
        self._read_wants_write = False
        try:
            return self.sock.recv(n)
        except ssl.SSLWantReadError:
            return None
        except ssl.SSLWantWriteError:  # TLS must send before it can read (not in TLS 1.3 as we use it)
            self._read_wants_write = True
            return None
        except ssl.SSLZeroReturnError:
            return b""

    async def wait_readable(self) -> None:
        """Until read_nowait may return something (after it returned None)."""
        self._quick = 0
        if self._read_wants_write:
            async with self._send_lock:  # the writer may be waiting on the same socket
                await trio.lowlevel.wait_writable(self.sock)
        else:
            await trio.lowlevel.wait_readable(self.sock)

    async def read(self, n: int) -> bytes:
        """Up to `n` bytes of plaintext; b"" at a clean close (close_notify) or at EOF."""
        while (data := self.read_nowait(n)) is None:
            await self.wait_readable()
        await self.quick_checkpoint()
        return data

    # -- writing -----------------------------------------------------------------------------------
    def try_write(self, data: bytes | bytearray | memoryview) -> bool:
        """Send all of `data` now if that needs no wait. False: nothing is known to be sent and
        `write(data)`, with the same data, must follow before anything else is written (OpenSSL
        may hold part of it)."""
        if self._send_lock.locked():
            return False
        try:
            self.sock.send(data)  # all of it: OpenSSL's partial-write mode is off
            return True
        except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
            return False

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        async with self._send_lock:
            while True:
                try:
                    self.sock.send(data)
                    break
                except ssl.SSLWantWriteError:
                    self._quick = 0
                    await trio.lowlevel.wait_writable(self.sock)
                except ssl.SSLWantReadError:  # a renegotiation TLS 1.3 does not have: the reader waits on it
                    self._quick = 0
                    await trio.sleep(0.001)
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
        """close_notify, then the connection: the peer reads a clean EOF."""
        if not self._closed:
            try:
                self.sock.unwrap()
            except (ssl.SSLError, OSError, ValueError):
                pass  # the peer's close_notify is not waited for; a full socket buffer skips ours
        await self.reset()

    async def reset(self) -> None:
        """The connection without close_notify: the peer's read ends at once."""
        self.done.set()
        if not self._closed:
            self._closed = True
            trio.lowlevel.notify_closing(self.sock)  # our own waits on it end (ClosedResourceError)
            self.sock.close()
        await trio.lowlevel.checkpoint()
