"""The data plane's messages, sans-IO: the offer a server makes over libp2p, and the frames that bind
a direct TLS connection to the libp2p stream the offer came on (node/dataplane.py moves them).

    client (or previous server)                        server
    Open | Attach                          (libp2p) ->
                                           (libp2p) <-  Opened | Attached {..., direct: {port, cert, token,
                                                                                        unix?, pid?}}
    TCP connect to the libp2p connection's IP : port, TLS 1.3, certificate's SHA-256 == cert
      (or, when that IP is a loopback address: the Unix socket `unix`, whose listener is process `pid`
       of the user owning the socket's private folder)
    Direct {token}                         (TLS)    ->
                                           (TLS)    <-  Directed | Error
    ...every later frame of that stream, both ways, over TLS; the libp2p stream stays open, idle.

The offer arrives over the Noise-authenticated libp2p stream, so pinning `cert` authenticates the
server, and so does finding process `pid` behind a socket in a folder only its user can write;
`token` (single use, short-lived) is what authenticates the dialer to the server. A dialer that
cannot connect, or meets another certificate or process, stays on libp2p.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llmswarm.node.errors import WireError
from llmswarm.node.wire.codec import Frame, MsgType

CERT_HEX_CHARS = 64  # SHA-256 of the DER certificate
TOKEN_HEX_CHARS = 64  # 32 random bytes
MAX_UNIX_PATH_BYTES = 107  # sun_path holds 108 bytes with the terminating NUL


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
    unix: str | None = None  # the same data plane on a Unix socket, for a dialer on this host
    pid: int | None = None  # the process listening there (checked with SO_PEERCRED)

    def to_header(self) -> dict[str, Any]:
        header: dict[str, Any] = {"port": self.port, "cert": self.cert, "token": self.token}
        if self.unix is not None and self.pid is not None:
            header |= {"unix": self.unix, "pid": self.pid}
        return header

    @classmethod
    def parse(cls, value: Any) -> DirectOffer | None:
        if value is None:
            return None
        if not isinstance(value, dict):
            raise WireError("direct must be {port, cert, token}")
        port = value.get("port")
        if type(port) is not int or not 0 < port < 65536:
            raise WireError("direct.port must be a TCP port")
        unix, pid = value.get("unix"), value.get("pid")
        if unix is not None or pid is not None:
            if not (isinstance(unix, str) and unix.startswith("/") and "\0" not in unix
                    and len(unix.encode("utf-8", "surrogatepass")) <= MAX_UNIX_PATH_BYTES):
                raise WireError(f"direct.unix must be an absolute path of at most {MAX_UNIX_PATH_BYTES} bytes")
            if type(pid) is not int or not 0 < pid < 2**31:
                raise WireError("direct.pid must be a process id")
        return cls(port, _hex(value.get("cert"), CERT_HEX_CHARS, "direct.cert"),
                   _hex(value.get("token"), TOKEN_HEX_CHARS, "direct.token"), unix, pid)


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
