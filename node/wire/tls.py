"""TLS over one TCP connection: the data plane's transport between hosts (node/dataplane.py).

A non-blocking `ssl.SSLSocket` does the TLS and the socket calls in C; the waiting, the checkpoints
and the closing are SocketTransport's (node/wire/socket_transport.py has the figures). OpenSSL is
only ever called from trio's one thread, and a write it could not finish is retried with the same
bytes before any other, as OpenSSL requires.
"""

from __future__ import annotations

import socket
import ssl

import trio
from llmswarm.node.wire.socket_transport import SocketTransport


class TlsTransport(SocketTransport):
    """SocketTransport over TLS on a connected TCP socket `sock`, after `handshake()`."""

    kind = "TLS"

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext, *, server_side: bool) -> None:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().__init__(ctx.wrap_socket(sock, server_side=server_side, do_handshake_on_connect=False))

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

    def read_nowait(self, n: int) -> bytes | None:
        """Up to `n` bytes of plaintext that are here now; b"" at a clean close (close_notify) or EOF;
        None when nothing is (then `wait_readable`). Socket and TLS errors are raised."""
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

    def has_input(self) -> bool:
        # decrypted bytes OpenSSL holds, or TLS records in the socket (perhaps only a session ticket:
        # a false "yes" only ends a draft's work ahead early)
        return self._closed or self.sock.pending() > 0 or super().has_input()

    def _send(self, data: memoryview) -> int:
        # all or nothing: OpenSSL's partial-write mode is off, so a record it began is finished by the
        # retry with the same bytes (write() retries from the same place: nothing was counted as sent).
        # SSLWantReadError (a renegotiation, which TLS 1.3 as configured here never asks for) is raised:
        # the stream ends, as on any TLS error.
        try:
            return self.sock.send(data)
        except ssl.SSLWantWriteError:
            return 0

    async def close(self) -> None:
        """close_notify, then the connection: the peer reads a clean EOF."""
        if not self._closed:
            try:
                self.sock.unwrap()
            except (ssl.SSLError, OSError, ValueError):
                pass  # the peer's close_notify is not waited for; a full socket buffer skips ours
        await self.reset()
