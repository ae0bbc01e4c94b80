"""The directory: how signed server records (node/records.py) spread through the swarm.

Three paths, every record verified by RecordStore.add whichever way it came:
  1. RECORD_PUT: a server sends each new record straight to the bootstrap peers it is connected
     to, which store it. Bootstrap peers are therefore a reliable registry even when gossip drops a
     message (py-libp2p 0.8.1 gossipsub is young; its default rate limit of 10 msg/s per topic
     silently drops the rest, which we raise).
  2. RECORDS_GET -> RECORDS: a snapshot pull from the bootstrap peers, on join, every
     SNAPSHOT_PULL_PERIOD_S, and on demand (`refresh()`). Paths 1+2 carry correctness: a record
     reaches a client at most one pull period after its server announced it.
  3. gossipsub, one topic per model: live pushes that make updates (a server going offline, a new
     server) visible in milliseconds. An accelerator only; topic validators verify records before
     they are relayed, so a forged record dies at the first honest hop.

Why not the Kademlia DHT of py-libp2p: no per-record TTL (fixed 24 h), one value per key
(petals needs one value per server under each block), reads that return a stale local copy first,
and peers that disagree on overwrites. Our records carry their own expiry and seq, so the
transport only has to deliver bytes; any path may duplicate, reorder or delay them.

Scale: a record is ~1 KB. Thousands of servers re-announcing every 30 s is ~100 records/s in all;
with dozens of models the per-model topics mean a client subscribes only to the model it runs and
sees a few records/s. Bootstrap peers hold everything (a few MB) and answer snapshots filtered by
model. Beyond that, shard bootstrap peers by model (each serves a set of topics); the record
format does not change.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio
from llmswarm.node import config
from llmswarm.node.discovery.records import RecordStore, ServerRecord, sign_record
from llmswarm.node.errors import DuplicatePeerError, ErrorCode, NodeError, PeerClosed, PeerError, RemoteError, WireError
from llmswarm.node.host import Host
from llmswarm.node.wire.codec import MsgType
from llmswarm.node.wire.records import Ack, RecordPut, Records, RecordsGet
from llmswarm.node.wire.stream import FramedStream

log = logging.getLogger(__name__)


def topic_of(model: str) -> str:
    return config.GOSSIP_TOPIC_PREFIX + model


class Directory:
    """A RecordStore fed by gossip, snapshots and direct puts. Build with `open_directory`."""

    def __init__(self, host: Host, bootstrap_addrs: Sequence[str], models: Sequence[str] | None) -> None:
        self.host = host
        self.bootstrap_addrs = list(bootstrap_addrs)
        self.models = list(models) if models is not None else None  # None: every model (bootstrap)
        self.store = RecordStore()
        self.pubsub: Any = None
        self._nursery: trio.Nursery | None = None
        self._subscribed: set[str] = set()
        self._bootstrap_ids: dict[str, str] = {}  # addr -> peer id once dialed
        self.unreachable: dict[str, str] = {}  # bootstrap addr -> why its last snapshot pull failed
        self.rejected = 0  # records refused by verification (forged, malformed, over a bound)
        self.published: set[int] = set()  # seqs of the records this process signed and published

    # -- reading -----------------------------------------------------------------------------------
    def records(self, model: str | None = None) -> list[ServerRecord]:
        return self.store.records(model)

    def _accept(self, data: bytes, source: str) -> bool:
        try:
            record = self.store.put(data)
        except WireError as e:
            self.rejected += 1
            log.debug("dropped a record from %s: %s", source, e)
            return False
        if record is not None and self.models is None:
            self._follow(record.model)
        return record is not None

    def _follow(self, model: str) -> None:
        """Bootstrap peers (models=None) join the topic of every model they learn of, to relay it."""
        if (self._nursery is not None and model not in self._subscribed
                and len(self._subscribed) < config.MAX_FOLLOWED_MODELS):
            self._nursery.start_soon(self._subscribe, model)

    # -- pulling snapshots -------------------------------------------------------------------------
    async def refresh(self, *, timeout_s: float = config.REQUEST_TIMEOUT_S) -> int:
        """Pull snapshots from every bootstrap peer at once; returns how many records were new."""
        counts: list[int] = []

        async def pull(addr: str) -> None:
            try:
                counts.append(await self._pull_one(addr, timeout_s))
                self.unreachable.pop(addr, None)
            except (NodeError, trio.TooSlowError) as e:
                self.unreachable[addr] = str(e) or "no answer in time"
                log.info("snapshot from %s failed: %s", addr, e)

        async with trio.open_nursery() as nursery:
            for addr in self.bootstrap_addrs:
                nursery.start_soon(pull, addr)
        return sum(counts)

    async def _pull_one(self, addr: str, timeout_s: float) -> int:
        with trio.fail_after(timeout_s * 2):  # dial + request, each bounded below as well
            peer_id = await self._ensure_connected(addr)
            stream = await self.host.open_stream(peer_id, config.PROTOCOL_RECORDS)
            try:
                new = 0
                for model in self.models if self.models is not None else [None]:
                    reply = await stream.request(RecordsGet(model).to_frame(), timeout_s=timeout_s)
                    try:
                        envelopes = Records.from_frame(reply).envelopes
                    except WireError as e:
                        raise PeerError(f"bootstrap {addr} answered RECORDS_GET badly: {e}") from None
                    new += sum(self._accept(e, "snapshot") for e in envelopes)
            except BaseException:
                await stream.reset()
                raise
            await stream.close()
            return new

    async def _ensure_connected(self, addr: str) -> str:
        peer_id = self._bootstrap_ids.get(addr)
        if peer_id is None or peer_id not in self.host.connected_peers():
            peer_id = await self.host.connect(addr)
            self._bootstrap_ids[addr] = peer_id
        return peer_id

    # -- publishing --------------------------------------------------------------------------------
    async def publish(self, data: bytes, *, timeout_s: float = config.REQUEST_TIMEOUT_S) -> None:
        """Store our own signed record, put it to every bootstrap peer, and gossip it."""
        record = self.store.put(data)
        if record is None:
            raise NodeError("record not newer than the one already published: stamp it with a new seq")
        self.published.add(record.seq)
        async with trio.open_nursery() as nursery:
            for addr in self.bootstrap_addrs:
                nursery.start_soon(self._put_one, addr, data, timeout_s)
            nursery.start_soon(self._gossip, record.model, data)

    async def _put_one(self, addr: str, data: bytes, timeout_s: float) -> None:
        try:
            with trio.fail_after(timeout_s * 2):
                peer_id = await self._ensure_connected(addr)
                stream = await self.host.open_stream(peer_id, config.PROTOCOL_RECORDS)
                try:
                    await stream.request(RecordPut(data).to_frame(), timeout_s=timeout_s)
                except BaseException:
                    await stream.reset()
                    raise
                await stream.close()
        except (NodeError, trio.TooSlowError) as e:
            log.info("putting our record to %s failed: %s", addr, e)

    async def _gossip(self, model: str, data: bytes) -> None:
        if self.pubsub is None:
            return
        try:
            with trio.fail_after(config.REQUEST_TIMEOUT_S):
                await self.pubsub.publish(topic_of(model), data)
        except Exception as e:  # gossip is best effort: puts and snapshots carry correctness
            log.info("gossiping a record failed: %s", e)

    # -- serving -----------------------------------------------------------------------------------
    async def handle_records(self, stream: FramedStream) -> None:
        """RECORDS_GET {"model": str|null} -> RECORDS; RECORD_PUT body=envelope -> ACK {"added"}."""
        while True:
            try:
                frame = await stream.recv(timeout_s=config.READ_TIMEOUT_S)
            except PeerClosed:
                return
            if frame.type == MsgType.RECORDS_GET:
                get = RecordsGet.from_frame(frame)
                await stream.send(Records(self.store.envelopes(get.model)).to_frame())
            elif frame.type == MsgType.RECORD_PUT:
                data = RecordPut.from_frame(frame).envelope
                try:
                    record = self.store.put(data)
                except WireError as e:
                    raise RemoteError(ErrorCode.BAD_RECORD, str(e)) from None
                if record is not None and self._nursery is not None:
                    # relay a fresh put into gossip, so subscribers get it pushed
                    self._follow(record.model)
                    self._nursery.start_soon(self._gossip, record.model, data)
                await stream.send(Ack(record is not None).to_frame())
            else:
                raise RemoteError(ErrorCode.BAD_REQUEST, f"unexpected {frame.type.name} on the records protocol")

    # -- gossip ------------------------------------------------------------------------------------
    async def _subscribe(self, model: str) -> None:
        if self.pubsub is None or model in self._subscribed or self._nursery is None:
            return
        self._subscribed.add(model)
        topic = topic_of(model)

        def valid(_peer: Any, msg: Any) -> bool:  # drop forged records before relaying them
            try:
                self.store.add(bytes(msg.data))  # verifies; also stores when newer
                return True
            except WireError:
                return False

        self.pubsub.set_topic_validator(topic, valid, False)
        try:
            sub = await self.pubsub.subscribe(topic)
        except Exception as e:
            log.info("gossip subscribe to %s failed: %s", topic, e)
            return
        self._nursery.start_soon(self._receive, sub)

    async def _receive(self, sub: Any) -> None:
        while True:
            msg = await sub.get()
            self._accept(bytes(msg.data), "gossip")

    async def _pull_forever(self, period_s: float) -> None:
        while True:
            await trio.sleep(period_s)
            await self.refresh()


def _make_gossipsub(host: Host) -> tuple[Any, Any]:
    from libp2p.custom_types import TProtocol
    from libp2p.pubsub.gossipsub import GossipSub
    from libp2p.pubsub.pubsub import Pubsub

    d = config.GOSSIP_DEGREE
    router = GossipSub(
        protocols=[TProtocol(config.GOSSIP_PROTOCOL)],
        degree=d,
        degree_low=max(1, d - 2),
        degree_high=d + 4,
        heartbeat_initial_delay=0.1,
        heartbeat_interval=config.GOSSIP_HEARTBEAT_INTERVAL_S,
        max_messages_per_topic_per_second=config.GOSSIP_MAX_MESSAGES_PER_TOPIC_PER_S,  # default 10/s drops silently
        eclipse_protection_enabled=False,  # needs >= 3 distinct IPs in a mesh: small swarms have fewer
    )
    return Pubsub(host.libp2p, router), router


@asynccontextmanager
async def open_directory(
    host: Host,
    bootstrap_addrs: Sequence[str] = (),
    models: Sequence[str] | None = None,
    *,
    gossip: bool = True,
    snapshot_period_s: float = config.SNAPSHOT_PULL_PERIOD_S,
    require_reachable: bool = True,
) -> AsyncIterator[Directory]:
    """Serve and follow the directory on `host`. `models=None` follows every model (bootstrap
    peers); clients and servers pass the model(s) they use. The first snapshot pull is done
    before the block starts: when no bootstrap peer answers it, that is a PeerError naming them
    (unless `require_reachable` is false, as for a bootstrap peer's optional replicas); later
    failures are logged and retried."""
    from libp2p.tools.anyio_service import background_trio_service

    d = Directory(host, bootstrap_addrs, models)
    host.set_handler(config.PROTOCOL_RECORDS, d.handle_records)
    # py-libp2p's service context (gossipsub) swallows an exception that passes through it: the
    # caller's error is carried out past it and raised here, or `join --blocks 0:999` exits 0.
    error: BaseException | None = None
    async with trio.open_nursery() as nursery:
        d._nursery = nursery
        async with _maybe_gossip(d, gossip, background_trio_service):
            for model in d.models or []:
                await d._subscribe(model)
            await d.refresh()
            if require_reachable and d.bootstrap_addrs and len(d.unreachable) == len(d.bootstrap_addrs):
                why = "; ".join(f"{a}: {e}" for a, e in d.unreachable.items())
                raise PeerError(f"could not reach any bootstrap peer ({why}): check --peers against the line "
                                "`llmswarm bootstrap` printed, and that it is still running")
            nursery.start_soon(d._pull_forever, snapshot_period_s)
            try:
                yield d
            except BaseException as e:  # noqa: BLE001 - re-raised below, outside the service
                error = e
            finally:
                nursery.cancel_scope.cancel()
    if error is not None:
        raise error


@asynccontextmanager
async def _maybe_gossip(d: Directory, enabled: bool, service: Callable[..., Any]) -> AsyncIterator[None]:
    if not enabled:
        yield
        return
    pubsub, router = _make_gossipsub(d.host)
    async with service(pubsub), service(router):
        with trio.fail_after(config.REQUEST_TIMEOUT_S):
            await pubsub.wait_until_ready()
        d.pubsub = pubsub
        try:
            yield
        finally:
            d.pubsub = None


async def announce_forever(
    d: Directory,
    make_record: Callable[[], ServerRecord],
    private_key: Any,
    period_s: float = config.ANNOUNCE_PERIOD_S,
    ttl_s: float | None = None,
    woken: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Publish a fresh record every `period_s` until cancelled; then publish it once more with
    state "offline" (shielded, bounded) so clients stop routing to us at once. `woken()` returns
    when something in the record changed (reachability, next-hop RTTs): publish then, not later."""
    ttl_s = period_s * config.RECORD_TTL_FACTOR if ttl_s is None else ttl_s
    last: ServerRecord | None = None
    first_seq: int | None = None
    try:
        while True:
            last = make_record().stamped(ttl_s)
            first_seq = last.seq if first_seq is None else first_seq
            try:
                await d.publish(sign_record(last, private_key))
            except NodeError as e:
                log.warning("announcing failed: %s", e)
            with trio.move_on_after(period_s):
                await (woken() if woken is not None else trio.sleep_forever())
                await trio.sleep(config.ANNOUNCE_MIN_GAP_S)
            _check_no_twin(d, last, first_seq)
    finally:
        if last is not None:
            with trio.move_on_after(config.REQUEST_TIMEOUT_S) as scope:
                scope.shield = True
                offline = last.stamped(ttl_s, state="offline")
                try:
                    await d.publish(sign_record(offline, private_key))
                except NodeError as e:
                    log.warning("announcing offline failed: %s", e)


def _check_no_twin(d: Directory, ours: ServerRecord, first_seq: int) -> None:
    """Two live processes with one key (a key file copied to another machine) announce under one peer
    id: clients then reach either at random. The newest record under our id must be one this process
    published (any of its records: the periodic ones, a move's, a change's)."""
    held = next((r for r in d.records(ours.model) if r.peer_id == ours.peer_id), None)
    if held is not None and held.seq > first_seq and held.seq not in d.published:
        raise DuplicatePeerError(
            f"another live process announces peer id {ours.peer_id} (its record lists {', '.join(held.addrs[:2])}):"
            " two processes share one key file; give one of them its own --identity FILE")


def is_live(record: ServerRecord, now: float | None = None) -> bool:
    """Online and not expired: what routing should consider."""
    now = time.time() if now is None else now
    return record.state == "online" and record.expires_at > now and not math.isnan(record.expires_at)
