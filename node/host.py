"""The one py-libp2p host of a process: TCP, Noise only, yamux, persistent identity, bounded waits.

py-libp2p 0.8.1 is young; this module wraps the traps listed in shared/reference/libp2p.md:
  1. an exception escaping a stream handler kills the connection's accept loop -> `set_handler`
     wraps every handler: catches everything, answers ERROR when it can, resets otherwise, closes;
  2. a peer killed mid-reply looks like a clean EOF -> framing in wire/stream.py;
  3. the swarm refuses to redial a peer for 60 s after a failed dial -> `_forget_failed_dial`
     before each dial we ask for explicitly (a restarted server is reachable at once);
  4/8. hung peers and silent listeners block dials, stream opens and reads forever -> every one
     is under trio.fail_after with a number from config;
  7. default security options accept /plaintext/2.0.0 -> Noise is the only security option;
  9. the 250 ms connect floor -> ConnectionConfig(max_connections_per_peer=1).
Identity: `open_host` holds its key's lock (node/identity.py) for the host's life, so no two live
processes share a peer id. Addresses: a wildcard listen address (0.0.0.0) is never announced; the
host announces `--announce-addr` first, then its interface addresses, then the addresses peers
observe (identify), loopback last (`_announce_factory`). `connect_any` tries every address of a peer
in order under one overall deadline.
Our own PING/PONG gives sub-millisecond RTTs (libp2p's ping reports whole milliseconds).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import multiaddr
import trio
from libp2p import create_yamux_muxer_option, new_host
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from llmswarm.node import config
from llmswarm.node.addrs import _announce_factory, _parse_announce_addr, check_bindable, dialable_addrs
from llmswarm.node.addrs import interface_ipv4s as interface_ipv4s  # re-exported
from llmswarm.node.errors import NodeError, PeerClosed, PeerError, RemoteError, WireError
from llmswarm.node.identity import acquire_identity
from llmswarm.node.nat import Nat, is_circuit
from llmswarm.node.wire.messages import Error, Ping, Pong
from llmswarm.node.wire.stream import FramedStream

if TYPE_CHECKING:
    from llmswarm.node.dataplane import DataPlane

# py-libp2p's yamux sends a window update after every read by default; go-yamux's rule (an update
# once half the window is consumed) is one frame instead of one per read: measured 1.58 -> 1.35 ms
# CPU per STEP/OUTPUT round trip. yamux reads the variable at each read; a user's own setting wins.
os.environ.setdefault("PY_YAMUX_RELEASE_ON_READ", "0")

log = logging.getLogger(__name__)

Handler = Callable[[FramedStream], Awaitable[None]]

_NOISY_LOGGERS = ("libp2p", "multiaddr", "async_service", "anyio_service", "aioquic", "upnp", "zeroconf")


def quiet_libp2p_logging(verbose: bool = False) -> None:
    """Silence py-libp2p's warnings in normal runs; `verbose=True` lets its INFO and up through."""
    level = logging.INFO if verbose else logging.CRITICAL + 1
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(level)


def _security_options(key_pair: KeyPair) -> dict[TProtocol, Any]:
    # Noise only: no TLS, no secio, and above all no /plaintext/2.0.0 fallback (trap 7).
    noise = NoiseTransport(key_pair, noise_privkey=create_x25519_key_pair().private_key)
    return {TProtocol(NOISE_PROTOCOL_ID): noise}


def parse_peer_addr(addr: str) -> Any:
    try:
        info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
    except Exception as e:
        raise PeerError(f"bad peer address {addr!r} ({e}); expected /ip4/HOST/tcp/PORT/p2p/PEER_ID") from None
    return info


class Host:
    """What the rest of llmswarm sees of libp2p. Build with `open_host`."""

    def __init__(self, libp2p_host: Any, key_pair: KeyPair, nat: Nat) -> None:
        self.libp2p = libp2p_host  # the raw py-libp2p host (gossipsub is mounted on it)
        self.key_pair = key_pair
        self.nat = nat  # reachability, relay reservations, circuits (node/nat.py)
        self.peer_id: str = libp2p_host.get_id().to_base58()
        self.dataplane: DataPlane | None = None  # a server's data-plane listener (node/dataplane.py)
        self.use_direct = config.USE_DIRECT  # move inference streams to a server's data plane when offered
        self.direct_failed: dict[str, float] = {}  # peer id -> trio time before which we do not dial it directly

    @property
    def private_key(self) -> Any:
        return self.key_pair.private_key

    @property
    def addrs(self) -> list[str]:
        """What we announce: behind NAT, our relay circuit addresses first (nobody outside can
        open a connection to the others), then the direct ones (a peer on our LAN may)."""
        direct = [str(a) for a in self.libp2p.get_addrs()]
        return [*self.nat.relay_addrs, *direct][: config.MAX_RECORD_ADDRS] if self.nat.relay_addrs else direct

    def reach(self, peer_id: str) -> str | None:
        """How we are connected to a peer now: "direct", "relayed", "hole-punched", or None."""
        return self.nat.reach(peer_id)

    def connected_peers(self) -> list[str]:
        return [str(p) for p in self.libp2p.get_connected_peers()]

    def peer_addrs(self, peer_id: str) -> list[str]:
        """Full multiaddrs (…/p2p/<id>) this host knows for a peer: what it can tell a third party."""
        try:
            known = self.libp2p.get_peerstore().addrs(ID.from_base58(peer_id))
        except Exception:  # noqa: BLE001 - py-libp2p raises PeerStoreError for an unknown peer
            return []
        return [a if "/p2p/" in a else f"{a}/p2p/{peer_id}" for a in map(str, known)][: config.MAX_RECORD_ADDRS]

    # -- handlers ----------------------------------------------------------------------------------
    def set_handler(self, protocol: str, handler: Handler) -> None:
        """Serve `protocol` with `handler(stream)`; see `_guarded` for what the wrapper guarantees."""

        async def guarded(raw_stream: Any) -> None:
            await _guarded(handler, FramedStream(raw_stream), protocol)

        self.libp2p.set_stream_handler(TProtocol(protocol), guarded)

    # -- dialing -----------------------------------------------------------------------------------
    def _forget_failed_dial(self, peer_id: ID) -> None:
        """Trap 3: the swarm keeps peers whose dial failed in a 60 s negative cache and refuses to
        redial them. Our dials are explicit and bounded, so we always retry for real."""
        cache = getattr(self.libp2p.get_network(), "_negative_peer_cache", None)
        if cache is not None:
            cache.evict(str(peer_id))

    async def connect(self, addr: str, *, timeout_s: float = config.DIAL_TIMEOUT_S) -> str:
        """Dial a full multiaddr (…/p2p/<id>); returns the peer id. PeerError on failure."""
        info = parse_peer_addr(addr)
        if info.peer_id == self.libp2p.get_id():
            raise PeerError(f"{addr} is this node itself")
        if is_circuit(addr):  # through a relay: py-libp2p's swarm never dials these itself
            if not self.libp2p.get_network().get_connections(info.peer_id):
                await self.nat.dial_circuit(addr, min(timeout_s, config.CIRCUIT_DIAL_TIMEOUT_S))
            return info.peer_id.to_base58()
        self._forget_failed_dial(info.peer_id)
        if not self.libp2p.get_network().get_connections(info.peer_id):
            # A restarted peer listens elsewhere; libp2p would keep dialling the dead address it
            # remembers and never try this one. We dial what we were told.
            self.libp2p.get_peerstore().clear_addrs(info.peer_id)
        await _bounded(self.libp2p.connect(info), timeout_s,
                       slow=f"could not reach {addr} within {timeout_s:g} s: is the peer up and reachable?",
                       failed=f"could not connect to {addr}")
        return info.peer_id.to_base58()

    async def connect_any(self, peer_id: str, addrs: list[str], *,
                          deadline_s: float = config.DIAL_ALL_TIMEOUT_S) -> str:
        """Connect to `peer_id` through the first of `addrs` that answers, tried in order, each dial
        bounded by DIAL_ADDR_TIMEOUT_S and all of them together by `deadline_s`. Addresses may be
        full (…/p2p/<id>, which must name `peer_id`) or bare; wildcards are skipped. A peer already
        connected costs nothing. PeerError naming the peer and the last failure otherwise."""
        if peer_id in self.connected_peers():
            return peer_id
        candidates = dialable_addrs(peer_id, addrs)
        if not candidates:
            raise PeerError(f"peer {peer_id[-8:]} announces no address we can dial ({len(addrs)} given)")
        errors: list[str] = []
        end = time.monotonic() + deadline_s
        for addr in candidates:
            left = end - time.monotonic()
            if left <= 0:
                errors.append(f"{len(candidates) - len(errors)} address(es) not tried in {deadline_s:g} s")
                break
            try:
                return await self.connect(addr, timeout_s=min(config.DIAL_ADDR_TIMEOUT_S, left))
            except PeerError as e:
                errors.append(str(e))
        raise PeerError(f"could not reach peer {peer_id[-8:]} at any of its {len(candidates)} address(es): "
                        f"{errors[-1] if errors else 'no time left'}")

    async def disconnect(self, peer_id: str) -> None:
        """Drop every connection to a peer (bounded, never raises): a peer that died and came back
        must be dialled afresh, not reached through the dead connection libp2p still holds."""
        with trio.move_on_after(config.CLOSE_TIMEOUT_S):
            try:
                await self.libp2p.get_network().close_peer(ID.from_base58(peer_id))
            except Exception as e:  # noqa: BLE001 - best effort: the connection may already be gone
                log.debug("disconnect %s: %s", peer_id[-8:], _short(e))

    async def open_stream(
        self, peer_id: str, protocol: str, *, timeout_s: float = config.STREAM_OPEN_TIMEOUT_S
    ) -> FramedStream:
        """Open a stream (dialing known addresses if not connected), bounded by `timeout_s`."""
        pid = ID.from_base58(peer_id)
        if not self.libp2p.get_network().get_connections(pid):
            self._forget_failed_dial(pid)
        raw = await _bounded(self.libp2p.new_stream(pid, [TProtocol(protocol)]), timeout_s,
                             slow=f"peer {peer_id[-8:]} did not open a {protocol} stream within {timeout_s:g} s",
                             failed=f"cannot open {protocol} to peer {peer_id[-8:]}")
        return FramedStream(raw)

    async def ping(
        self, peer_id: str, count: int = 3, *, timeout_s: float = config.PING_TIMEOUT_S
    ) -> list[float]:
        """RTTs in seconds of `count` PING/PONG round trips over one stream."""
        stream = await self.open_stream(peer_id, config.PROTOCOL_PING, timeout_s=timeout_s)
        rtts: list[float] = []
        try:
            for i in range(count):
                t0 = time.perf_counter()
                reply = await stream.request(Ping(i).to_frame(), timeout_s=timeout_s)
                rtts.append(time.perf_counter() - t0)
                try:
                    if Pong.from_frame(reply).n != i:
                        raise WireError(f"PONG {i} expected")
                except WireError as e:
                    raise PeerError(f"peer {peer_id[-8:]} answered PING badly: {e}") from None
        except BaseException:
            await stream.reset()
            raise
        await stream.close()
        return rtts


async def _bounded(call: Any, timeout_s: float, *, slow: str, failed: str) -> Any:
    """Await a libp2p call under a deadline (traps 4 and 8); whatever goes wrong is one PeerError."""
    try:
        with trio.fail_after(timeout_s):
            return await call
    except trio.TooSlowError:
        raise PeerError(slow) from None
    except (trio.Cancelled, KeyboardInterrupt):
        raise
    except Exception as e:
        raise PeerError(f"{failed}: {_short(e)}") from None


async def _guarded(handler: Handler, stream: FramedStream, protocol: str) -> None:
    """Run a handler so that nothing escapes to libp2p (trap 1): the stream is always closed; an
    error the peer can act on is answered with an ERROR frame; a broken stream is reset."""
    try:
        await handler(stream)
    except PeerError as e:
        if not isinstance(e, RemoteError):  # peer hung up, timed out or broke the stream: nobody to answer
            log.debug("%s handler: peer error: %s", protocol, e)
            await stream.reset()
            return
        await _answer_error(stream, Error.of(e))  # the handler refuses the request: tell the peer why
        return
    except trio.Cancelled:
        await stream.reset()
        raise  # host shutting down: cancellation must propagate to its nursery
    except BaseException as e:  # noqa: BLE001 - the whole point: never let anything escape
        if not isinstance(e, WireError):  # a malformed frame is the peer's doing; anything else is ours
            log.warning("%s handler failed: %s", protocol, _short(e), exc_info=log.isEnabledFor(logging.DEBUG))
        await _answer_error(stream, Error.of(e))
        return
    await stream.close()


async def _answer_error(stream: FramedStream, reply: Error) -> None:
    try:
        await stream.send(reply.to_frame(), timeout_s=config.CLOSE_TIMEOUT_S)
    except PeerError:
        await stream.reset()
        return
    await stream.close()


async def _ping_handler(stream: FramedStream) -> None:
    while True:
        try:
            frame = await stream.recv(timeout_s=config.READ_TIMEOUT_S)
        except PeerClosed:
            return
        await stream.send(Pong(Ping.from_frame(frame).n).to_frame())


def _short(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__


@asynccontextmanager
async def open_host(
    identity_path: str | Path | None = None,
    port: int = 0,
    listen_host: str = config.DEFAULT_LISTEN_HOST,
    *,
    key_pair: KeyPair | None = None,
    announce_addrs: list[str] | None = None,
    relay_service: bool = False,
    reachability: str = "auto",
) -> AsyncIterator[Host]:
    """Run one host listening on TCP `listen_host:port` (0 = any free port) until the block exits.

    The identity is `key_pair` if given, else the key at `identity_path` (default: the first free
    key of the default folder), locked for the host's life. `announce_addrs`: multiaddrs (a
    forwarded port, a public name) announced before the ones the host finds itself.
    `relay_service`: offer circuit relay v2 reservations to peers behind NAT (bootstrap peers do);
    `reachability`: "auto" (AutoNAT decides, see node/server/reach.py), "public" or "private"."""
    try:
        listen = multiaddr.Multiaddr(f"/ip4/{listen_host}/tcp/{int(port)}")
    except Exception as e:
        raise NodeError(f"bad listen address {listen_host}:{port}: {e}") from None
    extra = [_parse_announce_addr(a) for a in announce_addrs or []]
    check_bindable(listen_host, int(port))
    async with AsyncExitStack() as stack:
        if key_pair is None:
            key_pair = stack.enter_context(acquire_identity(identity_path)).key_pair
        box: dict[str, Any] = {}  # new_host may call the factory before it returns
        raw = new_host(
            key_pair=key_pair,
            sec_opt=_security_options(key_pair),
            muxer_opt=create_yamux_muxer_option(),
            listen_addrs=[listen],
            connection_config=ConnectionConfig(max_connections_per_peer=config.MAX_CONNECTIONS_PER_PEER),
            addrs_factory=lambda candidates: _announce_factory(box.get("raw"), candidates, extra),
        )
        box["raw"] = raw
        try:
            await stack.enter_async_context(raw.run(listen_addrs=[listen]))
        except OSError as e:
            raise NodeError(f"cannot listen on {listen_host}:{port}: {e}; pick another --port") from None
        stack.push_async_callback(_close_network, raw)
        nat = Nat(raw, relay_service=relay_service, reachability=reachability)
        await nat.start(stack)
        host = Host(raw, key_pair, nat)
        host.set_handler(config.PROTOCOL_PING, _ping_handler)
        yield host


async def _close_network(raw: Any) -> None:
    """Leaving host.run() does not close the swarm in 0.8.1: its TCP listener (a trio system task)
    keeps accepting and completing handshakes. Close connections and listeners explicitly."""
    with trio.move_on_after(config.HOST_CLOSE_TIMEOUT_S) as scope:
        scope.shield = True
        try:
            await raw.get_network().close()
        except Exception as e:
            log.debug("closing the swarm: %s", _short(e))


def ephemeral_host(port: int = 0, listen_host: str = config.DEFAULT_LISTEN_HOST):
    """A host with a fresh throwaway identity: clients need no stable peer id."""
    from libp2p.crypto.ed25519 import create_new_key_pair

    return open_host(port=port, listen_host=listen_host, key_pair=create_new_key_pair())
