"""TLS over one TCP connection, driven by hand: the data plane's transport (node/dataplane.py).

The standard library's `ssl.SSLObject` with two memory BIOs does the TLS; this module only moves
bytes between it and a trio socket stream. trio.SSLStream does the same with general machinery (a
retry loop per call, conflict detectors, locks) that cost ~90 us per message on this project's CPUs
(`llmswarm bench hop`: 0.59 ms per STEP/OUTPUT round trip over trio.SSLStream, 0.41 over bare TCP),
on a path every decode step crosses once per server. What a FramedStream needs is small: write a
whole buffer, read what has arrived, close cleanly or abort.

One reader task and one writer task may use a transport at once (a FramedStream's recv and send).
Anything TLS itself wants to send outside a write (the handshake; in principle a post-handshake
message) goes out under the same lock as writes, so records never interleave.
"""

from __future__ import annotations

import ssl

import trio
from llmswarm.node.locks import QuickLock

READ_BYTES = 65536


class TlsTransport:
    """read(n) / write(data) / close() / reset() over TLS on `tcp`, after `handshake()`."""

    def __init__(self, tcp: trio.SocketStream, ctx: ssl.SSLContext, *, server_side: bool) -> None:
        self.tcp = tcp
        self._incoming, self._outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._ssl = ctx.wrap_bio(self._incoming, self._outgoing, server_side=server_side)
        self._send_lock = QuickLock()
        self.done = trio.Event()  # closed or reset by its owner

    def peer_certificate(self) -> bytes:
        """The peer's certificate, DER (empty when it sent none)."""
        return self._ssl.getpeercert(binary_form=True) or b""

    async def handshake(self) -> None:
        while True:
            try:
                self._ssl.do_handshake()
            except ssl.SSLWantReadError:
                await self._flush()
                if not await self._receive():
                    raise ConnectionError("the peer closed the connection during the TLS handshake") from None
                continue
            await self._flush()
            return

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        async with self._send_lock:
            self._ssl.write(data)
            await self.tcp.send_all(self._outgoing.read())

    async def read(self, n: int) -> bytes:
        """Up to `n` bytes of plaintext; b"" at a clean close (close_notify) or at EOF."""
        while True:
            try:
                data = self._ssl.read(n)
            except ssl.SSLWantReadError:
                if self._outgoing.pending:
                    await self._flush()
                if not await self._receive():
                    return b""
                continue
            except ssl.SSLZeroReturnError:
                return b""
            if self._outgoing.pending:
                await self._flush()
            return data

    async def close(self) -> None:
        """close_notify, then the connection: the peer reads a clean EOF."""
        self.done.set()
        try:
            self._ssl.unwrap()
        except (ssl.SSLWantReadError, ssl.SSLError):
            pass  # the peer's close_notify is not waited for
        try:
            with trio.move_on_after(1.0):
                await self._flush()
        finally:
            await self.tcp.aclose()

    async def reset(self) -> None:
        """The connection without close_notify: the peer's read ends at once."""
        self.done.set()
        await trio.aclose_forcefully(self.tcp)

    async def _receive(self) -> bool:
        data = await self.tcp.receive_some(READ_BYTES)
        if not data:
            self._incoming.write_eof()
            return False
        self._incoming.write(data)
        return True

    async def _flush(self) -> None:
        async with self._send_lock:
            out = self._outgoing.read()
            if out:
                await self.tcp.send_all(out)
