"""The data plane's messages, sans-IO: the offer a server makes over libp2p, and the frames that bind
a direct TLS connection to the libp2p stream the offer came on (node/dataplane.py moves them).

    client (or previous server)                        server
    Open | Attach                          (libp2p) ->
                                           (libp2p) <-  Opened | Attached {..., direct: {port, cert, token}}
    TCP connect to the libp2p connection's IP : port, TLS 1.3, certificate's SHA-256 == cert
    Direct {token}                         (TLS)    ->
                                           (TLS)    <-  Directed | Error
    ...every later frame of that stream, both ways, over TLS; the libp2p stream stays open, idle.

The offer arrives over the Noise-authenticated libp2p stream, so pinning `cert` authenticates the
server; `token` (single use, short-lived) is what authenticates the dialer to the server. A dialer
that cannot connect, or meets another certificate, stays on libp2p.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llmswarm.node.errors import WireError
from llmswarm.node.wire.codec import Frame, MsgType

CERT_HEX_CHARS = 64  # SHA-256 of the DER certificate
TOKEN_HEX_CHARS = 64  # 32 random bytes


def _hex(value: Any, chars: int, what: str) -> str:
    if not (isinstance(value, str) and len(value) == chars and all(c in "0123456789abcdef" for c in value)):
        raise WireError(f"{what} must be {chars} lowercase hex characters")
    return value


@dataclass(frozen=True)
class DirectOffer:
    """Where and how to reach a server's data plane for one stream."""

    port: int
    cert: str
    token: str

    def to_header(self) -> dict[str, Any]:
        return {"port": self.port, "cert": self.cert, "token": self.token}

    @classmethod
    def parse(cls, value: Any) -> DirectOffer | None:
        if value is None:
            return None
        if not isinstance(value, dict):
            raise WireError("direct must be {port, cert, token}")
        port = value.get("port")
        if type(port) is not int or not 0 < port < 65536:
            raise WireError("direct.port must be a TCP port")
        return cls(port, _hex(value.get("cert"), CERT_HEX_CHARS, "direct.cert"),
                   _hex(value.get("token"), TOKEN_HEX_CHARS, "direct.token"))


@dataclass(frozen=True)
class Direct:
    token: str

    def to_frame(self) -> Frame:
        return Frame(MsgType.DIRECT, {"token": self.token})

    @classmethod
    def from_frame(cls, frame: Frame) -> Direct:
        if frame.type != MsgType.DIRECT:
            raise WireError(f"expected DIRECT, got {frame.type.name}")
        return cls(_hex(frame.header.get("token"), TOKEN_HEX_CHARS, "DIRECT token"))


@dataclass(frozen=True)
class Directed:
    def to_frame(self) -> Frame:
        return Frame(MsgType.DIRECTED)
