"""Behind NAT: reachability (AutoNAT), circuit relay v2 (relay service, reservations, dialing
`/p2p/RELAY/p2p-circuit/p2p/PEER` addresses), DCUtR hole punching, and how each peer is reached.

py-libp2p 0.8.1 ships the protocols; this module wraps them the way node/host.py wraps the rest
(every wait bounded, no exception escapes a handler) and works around what fails in 0.8.1:
  1. AutoNAT's dial-back (`AutoNATService._try_dial`) calls `host.connect`, which returns at once
     when a connection to the peer exists, and one always does (the peer asked over it): every
     node would be told it is public. `_AutoNAT` dials back on a fresh TCP connection and checks
     the peer's identity with a Noise handshake, outside the swarm.
  2. AutoNAT's server dials only advertised addresses whose IP equals the observed one; a node
     behind NAT advertises private addresses, so it always got E_DIAL_REFUSED ("unknown").
     `_AutoNAT` dials the observed IP on each advertised TCP port (still only the observed IP).
  3. The relay keys its open circuits by destination peer (`_active_relays[dest]`): when one of two
     circuits to the same server ends, its cleanup may close the other circuit's streams (seen with
     two clients on one server: the second client's next ping got EOF). `_Relay` closes exactly the
     two streams of the circuit that ended, and never touches that table.
  4. `Swarm.dial_peer` skips /p2p-circuit addresses; `dial_circuit` dials them through the relay
     transport (CONNECT to the relay, then Noise and yamux over the relayed stream).
  5. DCUtR's service drives a hole punch towards every relayed peer every 2 s from both ends, and
     closes the relayed connection 60 s after an upgrade, under any session stream still on it.
     `_DCUtR` only answers; `punch` is called by the side that dials (a client before it opens
     sessions, a server before it LINKs), and closes the relayed connection itself once a direct
     one is verified, so every later stream goes direct. The puncher must listen on a dialable
     address (`--host 0.0.0.0`): the peer behind NAT dials it back from its listen port.
"""

from __future__ import annotations

import logging
from contextlib import AsyncExitStack
from typing import Any

import multiaddr
import trio
from libp2p.custom_types import TProtocol
from libp2p.host.autonat.autonat import AUTONAT_PROTOCOL_ID, AutoNATService
from libp2p.host.autonat.pb.autonat_pb2 import Message
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.relay.circuit_v2.dcutr import PROTOCOL_ID as DCUTR_PROTOCOL_ID
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL_ID
from libp2p.relay.circuit_v2.protocol import STOP_PROTOCOL_ID, CircuitV2Protocol
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.transport import CircuitV2Transport
from libp2p.tools.anyio_service import background_trio_service
from llmswarm.node import config
from llmswarm.node.errors import NodeError, PeerError

log = logging.getLogger(__name__)

REACHABILITIES = ("auto", "public", "private")
DIRECT, RELAYED, PUNCHED = "direct", "relayed", "hole-punched"
_NOBODY = ID(b"\x00\x00llmswarm-no-peer")  # a key never in the relay's circuit table (see _Relay)


def is_circuit(addr: str) -> bool:
    return "/p2p-circuit" in addr


def circuit_addr(relay_addr: str, relay_id: str, self_id: str) -> str:
    """`RELAY_ADDR/p2p/RELAY/p2p-circuit/p2p/SELF`: how others reach us through that relay."""
    base = relay_addr if relay_addr.endswith(f"/p2p/{relay_id}") else f"/p2p/{relay_id}"
    return f"{base}/p2p-circuit/p2p/{self_id}"


def relay_of(addr: str) -> str | None:
    """The relay's peer id in a circuit address, else None."""
    if not is_circuit(addr):
        return None
    head = addr.split("/p2p-circuit")[0].split("/p2p/")
    return head[-1] if len(head) > 1 else None


def verdict(answers: list[bool | None], needed: int = config.AUTONAT_MIN_CONFIRMATIONS) -> str:
    """Reachability from AutoNAT answers (True: dialed back, False: could not, None: no answer):
    public once `needed` peers dialed us back, private once `needed` could not and none could,
    else unknown. One honest dial-back proves an address works; failures only count when no
    peer got through."""
    ok = sum(1 for a in answers if a is True)
    failed = sum(1 for a in answers if a is False)
    if ok >= needed:
        return "public"
    if failed >= needed and ok == 0:
        return "private"
    return "unknown"


class _AutoNAT(AutoNATService):
    """AutoNAT v1 with a dial-back that really dials (py-libp2p fixes 1 and 2 above)."""

    @staticmethod
    def _filter_by_observed_ip(addrs: list[bytes], observed_ip: str | None) -> list[bytes]:
        if observed_ip is None or ":" in observed_ip:
            return []
        ports: list[str] = []
        for raw in addrs:
            try:
                parts = str(multiaddr.Multiaddr(raw)).split("/")
            except Exception:  # noqa: BLE001 - a peer's garbage address: skip it
                continue
            if len(parts) > 4 and parts[3] == "tcp" and "p2p-circuit" not in parts and parts[4] not in ports:
                ports.append(parts[4])
        return [multiaddr.Multiaddr(f"/ip4/{observed_ip}/tcp/{p}").to_bytes()
                for p in ports[: config.AUTONAT_MAX_DIAL_BACKS]]

    async def _try_dial(self, peer_id: ID, addrs: list[bytes]) -> bytes | None:
        network = self.host.get_network()
        for raw_addr in addrs:
            addr = multiaddr.Multiaddr(raw_addr)
            raw = secured = None
            with trio.move_on_after(config.AUTONAT_DIAL_BACK_TIMEOUT_S):
                try:
                    transport = network.transport_manager.transport_for_dialing(addr)
                    raw = await transport.dial(addr)
                    secured = await network.upgrader.upgrade_security(raw, True, peer_id)
                    return bytes(raw_addr)
                except Exception as e:  # noqa: BLE001 - any failure means "not reachable there"
                    log.debug("autonat dial-back %s: %s", addr, e)
                finally:
                    for conn in (secured, raw):
                        if conn is not None:
                            with trio.move_on_after(config.CLOSE_TIMEOUT_S):
                                try:
                                    await conn.close()
                                except Exception:  # noqa: BLE001
                                    pass
        return None


class _Relay(CircuitV2Protocol):
    """The circuit relay (HOP) and its STOP side, each circuit closing only its own streams (3)."""

    async def _relay_data(self, src_stream: Any, dst_stream: Any, peer_id: ID, deadline: float | None = None,
                          circuit_data_limit: list[int] | None = None) -> None:
        try:
            await super()._relay_data(src_stream, dst_stream, _NOBODY, deadline, circuit_data_limit)
        finally:
            with trio.CancelScope(shield=True):
                await self._close_stream(src_stream)
                await self._close_stream(dst_stream)


class _DCUtR(DCUtRProtocol):
    """DCUtR that answers hole punches but never starts one by itself (see 5 above)."""

    async def _auto_drive_loop(self) -> None:
        await trio.sleep_forever()

    async def _try_unilateral_upgrade(self, peer_id: ID) -> bool:
        return False  # a private peer's own addresses are what AutoNAT found unreachable: 3 s saved

def _safe(handler: Any, name: str, timeout_s: float | None = config.NAT_HANDLER_TIMEOUT_S) -> Any:
    """Trap 1 of host.py for py-libp2p's own handlers: nothing escapes, the stream is reset."""

    async def guarded(stream: Any) -> None:
        try:
            with trio.fail_after(timeout_s if timeout_s is not None else float("inf")):
                await handler(stream)
        except trio.Cancelled:
            raise
        except BaseException as e:  # noqa: BLE001 - never let anything reach libp2p's accept loop
            log.debug("%s handler: %s", name, e)
            with trio.move_on_after(config.CLOSE_TIMEOUT_S):
                try:
                    await stream.reset()
                except Exception:  # noqa: BLE001
                    pass

    return guarded


class Nat:
    """One host's NAT machinery. `reachability` is "public", "private" or "unknown" (until AutoNAT
    answers, or as forced by --reachability); `relay_addrs` are the circuit addresses a private
    node announces first; `reach(peer)` says how this host reaches a peer right now."""

    def __init__(self, raw: Any, *, relay_service: bool, reachability: str) -> None:
        if reachability not in REACHABILITIES:
            raise NodeError(f"--reachability {reachability!r}: use one of {', '.join(REACHABILITIES)}")
        self.raw = raw
        self.relay_service = relay_service
        self.forced = reachability != "auto"
        self.reachability = reachability if self.forced else "unknown"
        self.relay_addrs: list[str] = []
        self.changed = trio.Event()  # set when reachability or relay addresses change (re-announce)
        self._relayed_once: set[str] = set()
        limits = RelayLimits(duration=config.RELAY_CIRCUIT_MAX_S, data=config.RELAY_CIRCUIT_MAX_BYTES,
                             max_circuit_conns=config.RELAY_MAX_CIRCUITS_PER_PEER,
                             max_reservations=config.RELAY_MAX_RESERVATIONS,
                             reservation_ttl=config.RELAY_RESERVATION_TTL_S)
        self.relay = _Relay(raw, limits=limits, allow_hop=relay_service)
        self.transport = CircuitV2Transport(raw, self.relay, RelayConfig(roles=RelayRole.STOP, limits=limits))
        self.autonat = _AutoNAT(raw, serve=False, confirmations=config.AUTONAT_MIN_CONFIRMATIONS)
        timeout = int(config.DCUTR_READ_TIMEOUT_S)
        self.dcutr = _DCUtR(raw, read_timeout=timeout, write_timeout=timeout,
                            dial_timeout=int(config.DIAL_ADDR_TIMEOUT_S))

    async def start(self, stack: AsyncExitStack) -> None:
        await stack.enter_async_context(background_trio_service(self.relay))
        with trio.move_on_after(config.HOST_CLOSE_TIMEOUT_S):
            await self.relay.event_started.wait()
        await stack.enter_async_context(background_trio_service(self.dcutr))
        with trio.move_on_after(config.HOST_CLOSE_TIMEOUT_S):
            await self.dcutr.event_started.wait()
        handlers = {STOP_PROTOCOL_ID: self.relay._handle_stop_stream,
                    AUTONAT_PROTOCOL_ID: self.autonat.handle_stream,
                    DCUTR_PROTOCOL_ID: self.dcutr._handle_dcutr_stream}
        for pid, fn in handlers.items():
            self.raw.set_stream_handler(TProtocol(pid), _safe(fn, str(pid)))
        if self.relay_service:  # a HOP stream carries its circuit for as long as the circuit lives
            self.raw.set_stream_handler(HOP_PROTOCOL_ID, _safe(self.relay._handle_hop_stream, "hop", None))

    # -- dialing ----------------------------------------------------------------------------------
    async def dial_circuit(self, addr: str, timeout_s: float) -> None:
        """Connect to a peer through a relay: CONNECT on the relay, then a secured, multiplexed
        connection over the relayed stream, registered with the swarm like any other."""
        relay = relay_of(addr)
        if relay is None:
            raise PeerError(f"{addr} is not a circuit address")
        try:
            with trio.fail_after(timeout_s):
                await self.transport.dial(multiaddr.Multiaddr(addr))
        except trio.TooSlowError:
            raise PeerError(f"no circuit through relay {relay[-8:]} within {timeout_s:g} s: {addr}") from None
        except (trio.Cancelled, KeyboardInterrupt):
            raise
        except Exception as e:  # noqa: BLE001 - one PeerError, whatever the relay said
            raise PeerError(f"relay {relay[-8:]} could not connect us ({str(e).splitlines()[0][:160]})") from None
        self._relayed_once.add(addr.rsplit("/p2p/", 1)[-1])

    def reach(self, peer_id: str) -> str | None:
        """DIRECT, RELAYED or PUNCHED (direct now, relayed before: DCUtR or a later direct dial);
        None when not connected."""
        try:
            conns = self.raw.get_network().get_connections(ID.from_base58(peer_id))
        except Exception:  # noqa: BLE001 - a malformed id: not connected
            return None
        kinds = set()
        for conn in conns:
            try:
                addrs = [str(a) for a in conn.get_transport_addresses()]
            except Exception:  # noqa: BLE001
                addrs = []
            kinds.add(RELAYED if any(is_circuit(a) for a in addrs) else DIRECT)
            if RELAYED in kinds:
                self._relayed_once.add(peer_id)
        if not kinds:
            return None
        if DIRECT in kinds:
            return PUNCHED if peer_id in self._relayed_once else DIRECT
        return RELAYED

    async def punch(self, peer_id: str) -> bool:
        """Upgrade a relayed connection to a direct one (DCUtR), bounded by DCUTR_TIMEOUT_S; on
        success close the relayed one. True when we end up directly connected."""
        if self.reach(peer_id) != RELAYED:
            return self.reach(peer_id) in (DIRECT, PUNCHED)
        if not self.dialable_listener():
            return False  # the peer could not dial us back: no point
        pid = ID.from_base58(peer_id)
        with trio.move_on_after(config.DCUTR_TIMEOUT_S):
            try:
                await self.dcutr.initiate_hole_punch(pid)
            except Exception as e:  # noqa: BLE001 - stay relayed
                log.debug("hole punch %s: %s", peer_id[-8:], e)
        if self.reach(peer_id) != PUNCHED:
            return False
        for conn in list(self.raw.get_network().get_connections(pid)):
            try:
                if any(is_circuit(str(a)) for a in conn.get_transport_addresses()):
                    with trio.move_on_after(config.CLOSE_TIMEOUT_S):
                        await conn.close()
            except Exception as e:  # noqa: BLE001 - it may be gone already
                log.debug("closing relayed connection to %s: %s", peer_id[-8:], e)
        return self.reach(peer_id) == PUNCHED

    def dialable_listener(self) -> bool:
        """Whether we listen on an address other than loopback (others could dial us back)."""
        return any(not a.startswith(("/ip4/127.", "/ip6/::1")) and not is_circuit(a)
                   for a in map(str, self.raw.get_addrs()))

    # -- reachability -----------------------------------------------------------------------------
    async def check(self, peers: list[str], own_addrs: list[str]) -> str:
        """Ask each peer (AutoNAT) to dial us back on a fresh connection; update reachability."""
        if self.forced:
            return self.reachability
        answers: list[bool | None] = []
        addrs = [multiaddr.Multiaddr(a).to_bytes() for a in own_addrs if not is_circuit(a)]

        async def ask(peer: str) -> None:
            try:
                status, _ = await self.autonat.query_server(ID.from_base58(peer), addrs,
                                                            timeout=config.AUTONAT_QUERY_TIMEOUT_S)
            except Exception as e:  # noqa: BLE001 - no answer from that peer
                log.debug("autonat query %s: %s", peer[-8:], e)
                answers.append(None)
                return
            answers.append(True if status == Message.OK else False if status == Message.E_DIAL_ERROR else None)

        async with trio.open_nursery() as nursery:
            for peer in peers[: config.AUTONAT_MAX_PEERS]:
                nursery.start_soon(ask, peer)
        found = verdict(answers)
        if found != "unknown" and found != self.reachability:
            self.reachability = found
            self._notify()
        return self.reachability

    # -- reservations -----------------------------------------------------------------------------
    async def reserve(self, relay_id: str, relay_addr: str) -> bool:
        """Reserve a slot on a relay we are connected to; on success its circuit address is ours."""
        stream = None
        try:
            with trio.fail_after(config.RELAY_RESERVE_TIMEOUT_S):
                stream = await self.raw.new_stream(ID.from_base58(relay_id), [HOP_PROTOCOL_ID])
                ok = await self.transport._make_reservation(stream, ID.from_base58(relay_id))
        except (trio.Cancelled, KeyboardInterrupt):
            raise
        except Exception as e:  # noqa: BLE001 - the relay refused, timed out or hung up
            log.debug("reservation on %s: %s", relay_id[-8:], e)
            ok = False
        finally:
            if stream is not None:
                with trio.move_on_after(config.CLOSE_TIMEOUT_S):
                    try:
                        await stream.close()
                    except Exception:  # noqa: BLE001
                        pass
        addr = circuit_addr(relay_addr, relay_id, self.raw.get_id().to_base58())
        if ok and addr not in self.relay_addrs:
            self.relay_addrs = [*self.relay_addrs, addr][: config.RELAY_MAX_RESERVED]
            self._notify()
        elif not ok and addr in self.relay_addrs:
            self.relay_addrs = [a for a in self.relay_addrs if a != addr]
            self._notify()
        return ok

    def _notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()
