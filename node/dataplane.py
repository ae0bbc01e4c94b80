"""The data plane: a session's hot stream moved off libp2p onto TLS over a direct TCP connection.

py-libp2p's Python Noise + yamux path costs about a millisecond per message; TLS from the standard
library over one TCP connection (driven by hand: node/wire/tls.py) costs a fraction of that.
Discovery, OPEN/ATTACH and everything else stay on libp2p; only the frames of one inference stream
(client -> server, or server -> next server with relay) move, and they are the same frames (node/wire/).

How it is authenticated (node/wire/direct.py has the exchange): a server makes one self-signed
certificate per process and offers, over the Noise-authenticated libp2p stream, its data-plane port,
the certificate's SHA-256 and a single-use token. The dialer connects to the IP its libp2p
connection already reaches, requires TLS 1.3 and exactly that certificate (pinning: no CA, no
hostname), and presents the token inside TLS; the server binds the connection to the stream the
token was offered on. No home-made cryptography: the TLS handshake proves the server holds the
pinned key, and the token never leaves the two channels that are encrypted to it.

Between processes of one host (the libp2p connection's address is a loopback one) the same data
plane is offered on a Unix socket too, in a folder only the server's user can enter: no TLS, and
cheaper socket calls. On a 2-core VM, right after a span's compute has flushed the caches, sending
and reading one 2.3 KB frame cost 115 + 109 us over TLS, 58 + 57 over bare TCP and 34 + 37 over a
Unix socket. The dialer authenticates the listener by the kernel's word (SO_PEERCRED): it must be
the process the offer names, running as the user who owns that private folder. The loopback and
the Unix socket never leave the kernel, so what TLS would add there is only its cost.

Anything that goes wrong (no direct libp2p connection to the peer, a closed or filtered port, a
different certificate, a refused token) leaves the stream on libp2p: the dialer falls back, bounded
by DIRECT_DIAL_TIMEOUT_S, and skips that peer for DIRECT_RETRY_S. A Unix socket that cannot be used
(another host, another process, a folder others can write) falls back to TLS.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import logging
import os
import secrets
import shutil
import socket
import ssl
import struct
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
from llmswarm.node import config
from llmswarm.node.errors import ErrorCode, NodeError, PeerError, RemoteError, WireError
from llmswarm.node.nat import DIRECT
from llmswarm.node.wire.codec import MsgType
from llmswarm.node.wire.direct import Direct, Directed, DirectOffer
from llmswarm.node.wire.messages import Error
from llmswarm.node.wire.socket_transport import SocketTransport
from llmswarm.node.wire.stream import FramedStream
from llmswarm.node.wire.tls import TlsTransport

if TYPE_CHECKING:
    from llmswarm.node.host import Host

log = logging.getLogger(__name__)

UNIX_FOLDER_PREFIX = "llmswarm-dp-"  # then the listening process's pid, "-", and mkdtemp's random part


def sweep_stale_folders(parent: str) -> int:
    """Remove the Unix-socket folders in `parent` that servers killed without cleanup left behind:
    ours (same user), named after a process that no longer exists, holding nothing but the socket.
    Returns how many went. A live pid (perhaps reused by another program) keeps its folder."""
    removed = 0
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return 0
    for entry in entries:
        pid_text = entry.name.removeprefix(UNIX_FOLDER_PREFIX).partition("-")[0]
        if not entry.name.startswith(UNIX_FOLDER_PREFIX) or not pid_text.isdigit():
            continue
        try:
            if not entry.is_dir(follow_symlinks=False) or entry.stat(follow_symlinks=False).st_uid != os.getuid():
                continue
            if os.listdir(entry.path) not in ([], ["data-plane"]) or pid_alive(int(pid_text)):
                continue
            shutil.rmtree(entry.path)
            removed += 1
        except OSError:
            continue  # gone meanwhile, or not ours to remove
    return removed


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host (ours or another user's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _server_context() -> tuple[ssl.SSLContext, str]:
    """A fresh self-signed EC P-256 certificate for this process: the TLS server context, and the
    certificate's SHA-256 (hex) that is pinned by whoever receives an offer."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "llmswarm data plane")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=config.DIRECT_CERT_DAYS)).sign(key, hashes.SHA256()))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.num_tickets = 0  # no resumption: every connection is a full handshake against the pinned key
    with tempfile.TemporaryDirectory() as folder:  # load_cert_chain reads files; the folder is 0700
        pem = Path(folder, "cert.pem")
        pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        ctx.load_cert_chain(pem)
    return ctx, hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def _client_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # no names and no CAs: the certificate itself is pinned (dial())
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class DataPlane:
    """A server's data-plane listener and the offers it has made."""

    def __init__(self, listen_host: str = config.DEFAULT_LISTEN_HOST, port: int = 0,
                 unix: bool = config.DIRECT_UNIX) -> None:
        self.listen_host, self.want_port, self.want_unix = listen_host, port, unix
        self.port = 0  # once listening
        self.unix_path: str | None = None  # once listening there too
        self.pid = os.getpid()
        self.ctx, self.cert = _server_context()
        self._offers: dict[str, tuple[FramedStream, float]] = {}  # token -> (stream, trio deadline)
        self._unbound = 0  # connections not yet bound to a stream
        self.bound = self.refused = 0  # connections bound to a stream; DIRECT frames with no live offer

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Listen until cancelled (start it with nursery.start: `port` is known when it returns)."""
        try:
            listeners = await trio.open_tcp_listeners(self.want_port, host=self.listen_host)
        except OSError as e:
            raise NodeError(f"cannot listen for the data plane on {self.listen_host}:{self.want_port}: {e}; "
                            "pick another --direct-port or use --no-direct") from None
        self.port = listeners[0].socket.getsockname()[1]
        folder = await self._listen_unix(listeners) if self.want_unix else None
        task_status.started()
        try:
            await trio.serve_listeners(self._handle, listeners)
        finally:
            self.unix_path = None
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)

    async def _listen_unix(self, listeners: list[trio.SocketListener]) -> str | None:
        """Also listen on a Unix socket in a fresh private folder; the folder, or None when this
        system cannot (the data plane then stays TLS only)."""
        if not hasattr(socket, "AF_UNIX"):
            return None
        sweep_stale_folders(tempfile.gettempdir())
        # 0700, a name nobody else could have taken; the pid in it lets a later server remove it if
        # this process dies without cleaning up (kill -9)
        folder = tempfile.mkdtemp(prefix=f"{UNIX_FOLDER_PREFIX}{os.getpid()}-")
        path = os.path.join(folder, "data-plane")
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.bind(path)
            sock.listen(128)
        except OSError as e:  # a TMPDIR too long for a socket path, say
            log.debug("data plane without a Unix socket: %s", e)
            sock.close()
            shutil.rmtree(folder, ignore_errors=True)
            return None
        listeners.append(trio.SocketListener(sock))
        self.unix_path = path
        return folder

    def offer(self, stream: FramedStream) -> DirectOffer | None:
        """A single-use offer to move `stream` here, or None (not listening, or too many pending)."""
        if not self.port:
            return None
        now = trio.current_time()
        self._offers = {t: o for t, o in self._offers.items() if o[1] > now and not o[0].closed}
        if len(self._offers) >= config.MAX_DIRECT_OFFERS:
            return None
        token = secrets.token_hex(32)
        self._offers[token] = (stream, now + config.DIRECT_OFFER_TTL_S)
        return DirectOffer(self.port, self.cert, token, self.unix_path, self.pid if self.unix_path else None)

    async def _handle(self, tcp: trio.SocketStream) -> None:
        """One incoming connection (TLS on the TCP port, none on the Unix socket), then DIRECT {token};
        bound to its stream, or closed."""
        if self._unbound >= config.MAX_DIRECT_UNBOUND:
            await trio.aclose_forcefully(tcp)
            return
        self._unbound += 1
        local = tcp.socket.family == getattr(socket, "AF_UNIX", None)
        transport = SocketTransport(_take_socket(tcp)) if local else \
            TlsTransport(_take_socket(tcp), self.ctx, server_side=True)
        bound = False
        try:
            with trio.move_on_after(config.DIRECT_HANDSHAKE_TIMEOUT_S):
                if isinstance(transport, TlsTransport):
                    await transport.handshake()
                fs = FramedStream(transport)
                frame = await fs.recv(timeout_s=config.DIRECT_HANDSHAKE_TIMEOUT_S, max_body=0)
                offer = self._offers.pop(Direct.from_frame(frame).token, None)
                if offer is None or offer[1] < trio.current_time() or offer[0].closed:
                    self.refused += 1
                    await fs.send(Error(ErrorCode.UNKNOWN_SESSION, "no such offer").to_frame())
                    return
                await fs.send(Directed().to_frame())
                offer[0].switch_to(transport, fs.take_buffer())
                bound = True
                self.bound += 1
        except (PeerError, WireError) as e:
            log.debug("data-plane connection refused: %s", e)
        except Exception as e:  # noqa: BLE001 - TLS and socket errors of one connection end it alone
            log.debug("data-plane connection failed: %s: %s", type(e).__name__, e)
        finally:
            self._unbound -= 1
            if not bound:
                with trio.CancelScope(shield=True):
                    await transport.reset()
        if bound:  # the stream owns the connection now (and closes it)
            await transport.done.wait()


async def dial(host: Host, stream: FramedStream, offer: DirectOffer | None) -> bool:
    """Move `stream` (just opened or attached, nothing read or sent since) to the offered data plane.
    True when it moved; False (and the stream still on libp2p) when it cannot. Never raises."""
    if offer is None or not host.use_direct:
        return False
    peer = stream.remote_peer_id
    if host.reach(peer) != DIRECT or trio.current_time() < host.direct_failed.get(peer, 0.0):
        return False  # relayed or hole-punched: a second direct connection would not get through
    try:
        ip = stream.libp2p.get_remote_address()[0]
    except Exception:  # noqa: BLE001 - a transport without an address (a relay circuit)
        return False
    transport: SocketTransport | None = None
    try:
        with trio.fail_after(config.DIRECT_DIAL_TIMEOUT_S):
            if offer.unix is not None and _is_loopback(ip):
                transport = await _dial_unix(offer)
            if transport is None:
                tcp = await trio.open_tcp_stream(ip, offer.port)
                transport = tls = TlsTransport(_take_socket(tcp), _client_context(), server_side=False)
                await tls.handshake()
                if hashlib.sha256(tls.peer_certificate()).hexdigest() != offer.cert:
                    raise PeerError("the data plane presented another certificate than the one offered")
            fs = FramedStream(transport)
            await fs.send(Direct(offer.token).to_frame())
            reply = await fs.recv(timeout_s=config.DIRECT_DIAL_TIMEOUT_S, max_body=0)
            if Error.raise_if(reply).type != MsgType.DIRECTED:
                raise WireError(f"expected DIRECTED, got {reply.type.name}")
            stream.switch_to(fs.stream, fs.take_buffer())
            return True
    except (trio.TooSlowError, PeerError, WireError, RemoteError, OSError, ssl.SSLError,
            trio.BrokenResourceError, trio.ClosedResourceError) as e:
        log.debug("data plane of %s not used: %s: %s", peer[-8:], type(e).__name__, e)
        host.direct_failed[peer] = trio.current_time() + config.DIRECT_RETRY_S
        if transport is not None:
            await transport.reset()
        return False
    except BaseException:  # cancelled: let the half-made connection go with us
        if transport is not None:
            with trio.CancelScope(shield=True):
                await transport.reset()
        raise


def _is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


async def _dial_unix(offer: DirectOffer) -> SocketTransport | None:
    """The offer's Unix socket, if it is on this host and the kernel says its listener is the process
    the offer names, running as the user whose private folder holds the socket; else None."""
    if offer.unix is None or not hasattr(socket, "SO_PEERCRED"):
        return None
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.connect(offer.unix)
        pid, uid, _ = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
        folder = os.stat(os.path.dirname(offer.unix))
        if pid != offer.pid or uid != folder.st_uid or folder.st_mode & 0o077:
            raise PeerError(f"the Unix socket's listener is process {pid} of user {uid}, not the one offered")
    except (OSError, PeerError) as e:
        log.debug("data plane's Unix socket %s not used: %s", offer.unix, e)
        sock.close()
        return None
    return SocketTransport(socket.socket(fileno=sock.detach()))


def _take_socket(tcp: trio.SocketStream) -> socket.socket:
    """The standard-library socket under a trio stream, which is left holding nothing (closing it is a
    no-op): the data plane's transports drive the socket themselves (node/wire/socket_transport.py)."""
    return socket.socket(fileno=tcp.socket.detach())
