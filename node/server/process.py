"""A server process: join the swarm, load a span, measure it, announce it, serve until stopped.

`serve()` is what `llmswarm join` runs. The host and the directory come up first (so
`--num-blocks` can see where the swarm is weakest, and the server is announced as "joining" while
it loads); weights load in a worker thread so the host keeps answering. A clean stop (Ctrl-C,
SIGTERM) announces "offline" before the process exits.
"""

from __future__ import annotations

import functools
import random
import signal
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import trio
from llmswarm.models.checkpoint import Checkpoint
from llmswarm.models.device import MemoryPlan, plan_for_device
from llmswarm.models.fetch import locate
from llmswarm.models.registry import resolve
from llmswarm.models.span import Span, load_span, parse_dtype
from llmswarm.node import config
from llmswarm.node.dataplane import DataPlane
from llmswarm.node.discovery.directory import Directory, announce_forever, open_directory
from llmswarm.node.discovery.records import ServerRecord, sign_record
from llmswarm.node.discovery.swarm_view import live_records
from llmswarm.node.errors import NodeError, PeerError, UsageError
from llmswarm.node.host import Host, open_host
from llmswarm.node.server.health import HealthCollector
from llmswarm.node.server.pace import ServedSpeed, rtts_changed
from llmswarm.node.server.reach import keep_reachable
from llmswarm.node.server.span_server import NextHopLookup, SpanServer
from llmswarm.routing.balance import better_start, choose_start


@dataclass
class ServeOptions:
    model: str
    blocks: tuple[int, int] | None = None  # explicit span
    num_blocks: int | None = None  # or: this many blocks where the swarm is weakest (None: as many as fit)
    peers: list[str] = field(default_factory=list)
    port: int = 0
    listen_host: str = config.DEFAULT_LISTEN_HOST
    announce_addrs: list[str] = field(default_factory=list)  # announced first (a forwarded port)
    device: str = "cpu"
    dtype: str | None = None
    public_name: str = ""
    max_sessions: int = config.DEFAULT_MAX_SESSIONS
    peer_share: float = config.PEER_SHARE  # one client's most of the sessions and cache
    cache_tokens: int | None = None  # None: config.DEFAULT_CACHE_TOKENS, capped by DEFAULT_CACHE_BYTES
    announce_period_s: float = config.ANNOUNCE_PERIOD_S
    identity: str | None = None
    rebalance_period_s: float = config.REBALANCE_PERIOD_S  # 0 = never move
    quant: str = "none"  # "none" | "int8" | "nf4" (models/quant.py)
    reachability: str = "auto"  # "auto" (AutoNAT decides) | "public" | "private" (node/server/reach.py)
    relay_service: bool = False  # offer circuit-relay slots to servers behind NAT (if we are public)
    direct: bool = config.USE_DIRECT  # a TLS data plane for sessions' streams (node/dataplane.py)
    direct_port: int = 0  # its TCP port (0: any free one; it is offered over libp2p, never announced)


class ServeEvents:
    """What the CLI is told while a server runs (it renders; we never print)."""

    def progress(self, task: str, done: float, total: float | None) -> None: ...
    def ready(self, info: dict[str, Any]) -> None: ...
    def status(self, info: dict[str, Any]) -> None: ...
    def stopping(self) -> None: ...
    def moved(self, info: dict[str, Any]) -> None: ...
    def planned(self, line: str) -> None: ...


@dataclass
class Throughput:
    inference_rps: float  # decode steps per second per block
    prefill_tps: float  # prefill tokens per second through the whole span
    throughput: float  # decode tokens per second through the whole span (one session)


def measure_throughput(span: Span, decode_steps: int = 8, prefill_tokens: int = 128) -> Throughput:
    """Time real steps of this span (which also warms its kernels up before the first client)."""
    gen = torch.Generator().manual_seed(0)
    hidden = span.cfg.hidden_size
    cache = span.new_cache(prefill_tokens + decode_steps + 1)
    x = torch.randn(1, prefill_tokens, hidden, generator=gen).to(span.dtype)
    cache.reserve(0, prefill_tokens + decode_steps)  # a KVCache's room is all there: this only checks it
    span.forward(x[:, :16], cache, 0)  # warm-up
    started = time.perf_counter()
    span.forward(x, cache, 0)
    prefill_s = time.perf_counter() - started
    step = x[:, :1]
    times = []
    for i in range(decode_steps):
        started = time.perf_counter()
        span.forward(step, cache, prefill_tokens + i)
        times.append(time.perf_counter() - started)
    per_step = statistics.median(times)
    return Throughput(span.num_blocks / per_step, prefill_tokens / prefill_s, 1.0 / per_step)


async def in_passing_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """Run torch work off the event loop in a thread that ends with it (trio's workers linger 10 s).

    A live thread that ran OpenMP keeps its own team of workers; once a process has more OpenMP
    threads than cores, GNU OpenMP drops to a short spin and the loop thread's steps take twice as
    long (smollm2-135m decode step: 46 ms instead of 25 ms, measured with a finished trio worker
    still cached). Steps and throughput measurements run on the loop thread itself."""
    token = trio.lowlevel.current_trio_token()
    done = trio.Event()
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting task
            result["error"] = e
        token.run_sync_soon(done.set)

    threading.Thread(target=target, name="llmswarm-load", daemon=True).start()
    await done.wait()
    if "error" in result:
        raise result["error"]
    return result["value"]


async def serve(opts: ServeOptions, events: ServeEvents) -> None:
    spec = resolve(opts.model)
    dtype = parse_dtype(opts.dtype, opts.device)
    joined_at = time.monotonic()
    async with open_host(opts.identity, port=opts.port, listen_host=opts.listen_host,
                         announce_addrs=opts.announce_addrs, relay_service=opts.relay_service,
                         reachability=opts.reachability) as host, trio.open_nursery() as plane:
        host.use_direct = opts.direct
        if opts.direct:
            host.dataplane = DataPlane(opts.listen_host, opts.direct_port)
            await plane.start(host.dataplane.serve)
        async with open_directory(host, opts.peers, [spec.name]) as directory:
            folder = await in_passing_thread(lambda: locate(spec, events.progress, _want_for(opts)))
            ckpt = Checkpoint.open(folder)
            plan = _memory_plan(opts, ckpt, dtype)
            start, end = _pick_span(opts, ckpt, directory, spec.name, plan.num_blocks if plan else None)
            if plan is not None:
                placement = f"blocks {start}:{end}, where the swarm is weakest: {plan.reason()}"
                getattr(events, "planned", lambda _: None)(placement)
            span = await in_passing_thread(
                lambda: load_span(ckpt, start, end, dtype, opts.device, events.progress, quant=opts.quant))
            events.progress("timing threads for small steps", 0, None)
            threads = span.tune_threads()  # on the loop thread, where steps will run
            events.progress("measuring throughput", 0, None)
            speed = measure_throughput(span)  # on the thread that will serve steps, or it under-reports 2x
            server = SpanServer(spec.name, span, opts.max_sessions, opts.cache_tokens, host=host,
                                peer_share=opts.peer_share,
                                next_hop=_next_hop_lookup(directory, spec.name, ckpt.config.num_blocks))
            host.set_handler(config.PROTOCOL_INFERENCE, server.handle)
            state = _State(server, speed, ckpt.config.num_blocks)
            server.scheduler.on_compute = state.pace.observe

            def make_record() -> ServerRecord:
                return state.record(host, spec.name, str(dtype).removeprefix("torch."), opts.public_name)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(server.run)
                nursery.start_soon(functools.partial(announce_forever, directory, make_record, host.private_key,
                                                     opts.announce_period_s, woken=state.woken))
                nursery.start_soon(keep_reachable, host, directory, spec.name, state.wake)
                nursery.start_soon(_measure_next_hops, host, directory, state, opts.announce_period_s)
                nursery.start_soon(_report_status, server, events)
                if opts.rebalance_period_s > 0:
                    nursery.start_soon(_rebalance_forever, host, directory, state, ckpt, opts, dtype, events,
                                       make_record)
                events.ready({"peer_id": host.peer_id, "addrs": host.addrs, "model": spec.name, "start": start,
                              "end": end, "dtype": str(dtype).removeprefix("torch."), "quant": span.quant,
                              "device": str(span.device), "step_threads": threads and vars(threads),
                              "seconds_to_announce": round(time.monotonic() - joined_at, 3),
                              "inference_rps": round(speed.inference_rps, 2), "reachability": host.nat.reachability,
                              "direct_port": host.dataplane.port if host.dataplane else None,
                              "throughput": round(speed.throughput, 2)})
                await _until_signal()
                events.stopping()
                nursery.cancel_scope.cancel()  # announce_forever publishes "offline" on its way out
        plane.cancel_scope.cancel()


class _State:
    def __init__(self, server: SpanServer, speed: Throughput, num_blocks: int) -> None:
        self.server, self.num_blocks = server, num_blocks
        self.pace = ServedSpeed(speed.inference_rps, speed.prefill_tps)  # follows served steps
        self.next_rtts: dict[str, float] = {}
        self.health = HealthCollector(str(server.span.device))
        self._nudge = trio.Event()

    @property
    def speed(self) -> Throughput:
        """The announced speed: the startup measurement, then what served steps show."""
        p = self.pace
        return Throughput(p.inference_rps, p.prefill_tps, p.throughput(self.server.span.num_blocks))

    @speed.setter
    def speed(self, measured: Throughput) -> None:  # a new span (rebalance): start from its measurement
        self.pace = ServedSpeed(measured.inference_rps, measured.prefill_tps)
        self.server.scheduler.on_compute = self.pace.observe

    def wake(self) -> None:
        """Something in our record changed: the announcer publishes now."""
        self._nudge.set()

    async def woken(self) -> None:
        await self._nudge.wait()
        self._nudge = trio.Event()

    def record(self, host: Host, model: str, dtype: str, public_name: str) -> ServerRecord:
        from importlib.metadata import version

        s = self.server
        return ServerRecord(
            peer_id=host.peer_id, model=model, num_blocks=self.num_blocks, start=s.span.start, end=s.span.end,
            addrs=host.addrs, state="online", inference_rps=self.speed.inference_rps,
            prefill_tps=self.speed.prefill_tps, throughput=self.speed.throughput,
            cache_tokens_left=s.cache_tokens_left, sessions=s.stats.sessions, version=version("llmswarm"),
            dtype=dtype, quant=s.span.quant, public_name=public_name, next_rtts=dict(self.next_rtts),
            reach="relayed" if host.nat.relay_addrs else "direct", relay_service=host.nat.relay_service,
            health=self.health.collect(sessions=s.stats.sessions, tokens_served=s.stats.tokens_served,
                                       cache_tokens_in_use=s.cache_tokens - s.cache_tokens_left),
        )


def _next_hop_lookup(directory: Directory, model: str, num_blocks: int) -> NextHopLookup:
    """Where a LINK may send relayed steps: the addresses of a live record holding the block (the
    directory is refreshed once when the peer is not known yet: it may have joined a moment ago)."""

    async def lookup(peer_id: str, block: int) -> list[str] | None:
        for attempt in range(2):
            for r in live_records(directory.records(model), model, num_blocks):
                if r.peer_id == peer_id and r.start <= block < r.end:
                    return list(r.addrs)
            if attempt == 0:
                await directory.refresh()
        return None

    return lookup


def _want_for(opts: ServeOptions) -> Callable[[Checkpoint], list[str]] | None:
    """For hub models: download only the shards of our blocks (all of them when the span is not yet known)."""
    if opts.blocks is None:
        return None

    start, end = opts.blocks
    return lambda ck: ck.span_keys(start, end)


def _memory_plan(opts: ServeOptions, ckpt: Checkpoint, dtype: torch.dtype) -> MemoryPlan | None:
    """Neither --blocks nor --num-blocks: as many blocks as fit in free memory (models/device.py)."""
    if opts.blocks is not None or opts.num_blocks is not None:
        return None
    tokens = opts.cache_tokens or config.DEFAULT_CACHE_TOKENS
    cap = None if opts.cache_tokens else config.DEFAULT_CACHE_BYTES  # as SpanServer caps its default pool
    return plan_for_device(ckpt.config, opts.device, dtype, opts.quant, tokens, cap)


def _pick_span(opts: ServeOptions, ckpt: Checkpoint, directory: Directory, model: str,
               planned: int | None = None) -> tuple[int, int]:
    total = ckpt.config.num_blocks
    if opts.blocks is not None:
        start, end = opts.blocks
        if not 0 <= start < end <= total:
            raise UsageError(f"--blocks {start}:{end} is outside {model}'s blocks 0:{total}")
        return start, end
    n = opts.num_blocks or planned or total
    if not 0 < n <= total:
        raise UsageError(f"--num-blocks {n} must be between 1 and {total} for {model}")
    spans = [(r.start, r.end, r.throughput) for r in live_records(directory.records(model), model, total)]
    start = choose_start(total, n, spans)
    return start, start + n


async def _measure_next_hops(host: Host, directory: Directory, state: _State, period_s: float) -> None:
    """RTTs to the servers a chain may hand over to after us (their span holds our end block)."""
    while True:
        model, end = state.server.model, state.server.span.end
        targets = [r for r in live_records(directory.records(model), model, state.num_blocks)
                   if r.start <= end < r.end and r.peer_id != host.peer_id]
        rtts = {}
        for r in targets[: config.MAX_RECORD_NEXT_RTTS]:
            try:
                await host.connect_any(r.peer_id, r.addrs)
                await host.nat.punch(r.peer_id)  # behind NAT: direct if DCUtR gets through, else relayed
                rtts[r.peer_id] = statistics.median(await host.ping(r.peer_id, config.NEXT_HOP_PING_COUNT))
            except PeerError:
                continue
        if rtts_changed(state.next_rtts, rtts):
            state.wake()  # published now: fresh within one announce period of a change, not two
        state.next_rtts = rtts
        # A server that finds no next hop yet (it joined first, or the next one is still loading), or
        # cannot reach one, looks again soon: until it publishes these RTTs, routes through it are
        # priced with guesses. Once every next hop is measured, twice per announce period.
        complete = bool(targets) and len(rtts) == len(targets[: config.MAX_RECORD_NEXT_RTTS])
        await trio.sleep(period_s * config.NEXT_HOP_REFRESH_FRACTION if complete
                         else min(period_s, config.NEXT_HOP_RETRY_S))


async def _rebalance_forever(host: Host, directory: Directory, state: _State, ckpt: Checkpoint,
                             opts: ServeOptions, dtype: torch.dtype, events: ServeEvents,
                             make_record: Callable[[], ServerRecord]) -> None:
    """Every period: would moving raise the swarm's weakest block markedly? Then load the new span
    (the old one keeps serving meanwhile), swap it in, and announce at once. Never with sessions
    open: a better place is not worth breaking someone's chat. The period is jittered and the
    directory refreshed just before deciding, so two servers rarely both rush to the same gap."""
    server = state.server
    rng = random.Random(host.peer_id)
    while True:
        await trio.sleep(opts.rebalance_period_s * rng.uniform(0.5, 1.5))
        if server.stats.sessions:
            continue
        await directory.refresh()
        span = server.span
        others = [(r.start, r.end, r.throughput)
                  for r in live_records(directory.records(server.model), server.model, state.num_blocks)
                  if r.peer_id != host.peer_id]
        target = better_start(state.num_blocks, span.start, span.num_blocks, state.speed.throughput, others)
        if target is None:
            continue
        end = target + span.num_blocks
        events.progress(f"moving to blocks {target}:{end}", 0, None)
        new = await in_passing_thread(functools.partial(load_span, ckpt, target, end, dtype, opts.device,
                                                        events.progress, quant=opts.quant))
        new.step_threads = span.step_threads  # the same machine and the same span length
        state.speed = measure_throughput(new)
        old = (span.start, span.end)
        server.span = new
        try:
            ttl_s = opts.announce_period_s * config.RECORD_TTL_FACTOR
            await directory.publish(sign_record(make_record().stamped(ttl_s), host.private_key))
        except NodeError:
            pass  # the regular announcement follows within one period
        events.moved({"from": f"{old[0]}:{old[1]}", "to": f"{target}:{end}"})


async def _report_status(server: SpanServer, events: ServeEvents) -> None:
    while True:
        s = server.stats
        events.status({"sessions": s.sessions, "tokens_served": s.tokens_served,
                       "steps_per_s": round(s.steps_per_s(), 2), "cache_tokens_left": server.cache_tokens_left,
                       "errors": s.errors})
        await trio.sleep(config.STATUS_PERIOD_S)


async def _until_signal() -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            return
