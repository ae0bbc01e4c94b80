"""`llmswarm bench hop`: what one STEP/OUTPUT round trip costs each transport, with no model.

Two hosts in this process (so CPU time is both ends' together): one STEP of `hidden` float32 values
out, its OUTPUT back, through a FramedStream over libp2p (Noise + yamux), over the data plane (the
same stream after `dataplane.dial`: TLS 1.3 on a direct TCP connection, and the Unix socket that
processes of one host use instead), and over bare TCP (a reference, not a transport llmswarm uses).
The transports are alternated `rounds` times; figures are medians: wall ms per round trip and CPU ms
per round trip (the latter barely moves with other load).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import trio
from llmswarm.node import dataplane
from llmswarm.node.dataplane import DataPlane
from llmswarm.node.errors import PeerError
from llmswarm.node.host import ephemeral_host, quiet_libp2p_logging
from llmswarm.node.wire.messages import Attached, Output, Ping, Step
from llmswarm.node.wire.stream import FramedStream

PROTOCOL_ECHO = "/llmswarm/bench-echo/1"  # mounted on the benchmark's own throwaway host only


class _Tcp:
    def __init__(self, s: trio.SocketStream) -> None:
        self.s = s

    async def read(self, n: int) -> bytes:
        return await self.s.receive_some(n)

    async def write(self, data: bytes) -> None:
        await self.s.send_all(data)

    async def close(self) -> None:
        await self.s.aclose()

    reset = close


async def _echo(stream: FramedStream, hidden: int) -> None:
    while True:
        try:
            frame = await stream.recv(timeout_s=math.inf)
        except PeerError:
            return
        step = Step.from_frame(frame, hidden, 1)
        await stream.send(Output(step.seq, step.hidden).to_frame())


async def _round_trips(stream: FramedStream, hidden: int, n: int) -> tuple[float, float]:
    x = torch.randn(1, 1, hidden)
    times = []
    cpu = time.process_time()
    for i in range(n):
        t0 = time.perf_counter()
        await stream.send(Step(i, 0, x).to_frame())
        Output.from_frame(await stream.recv(), hidden, 1)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times), 1000 * (time.process_time() - cpu) / n


def bench_hop(round_trips: int = 400, rounds: int = 3, hidden: int = 576,
              progress: Callable[..., None] = lambda *a: None) -> dict[str, Any]:
    quiet_libp2p_logging()

    async def run() -> dict[str, list[tuple[float, float]]]:
        async with ephemeral_host() as server, ephemeral_host() as client, trio.open_nursery() as nursery:
            server.dataplane = DataPlane("127.0.0.1")
            await nursery.start(server.dataplane.serve)

            async def serve_libp2p(stream: FramedStream) -> None:
                await stream.recv()  # PING: answered with the data plane's offer, as ATTACHED is
                await stream.send(Attached(server.dataplane.offer(stream)).to_frame())
                await _echo(stream, hidden)

            async def serve_tcp(s: trio.SocketStream) -> None:
                await _echo(FramedStream(_Tcp(s)), hidden)

            server.set_handler(PROTOCOL_ECHO, serve_libp2p)
            listeners = await nursery.start(functools.partial(trio.serve_tcp, serve_tcp, 0, host="127.0.0.1"))
            tcp_port = listeners[0].socket.getsockname()[1]
            await client.connect(next(a for a in server.addrs if "/ip4/127.0.0.1/" in a))
            streams = {}
            for name in ("libp2p", "data_plane", "data_plane_unix"):
                stream = await client.open_stream(server.peer_id, PROTOCOL_ECHO)
                offer = Attached.from_frame(await stream.request(Ping(0).to_frame())).direct
                if name == "data_plane":  # the TLS port, as a client on another host reaches it
                    offer = dataclasses.replace(offer, unix=None, pid=None)
                if name != "libp2p" and not await dataplane.dial(client, stream, offer):
                    raise PeerError("the data plane could not be reached on 127.0.0.1")
                want = {"data_plane": "TlsTransport", "data_plane_unix": "SocketTransport"}.get(name)
                if want and type(stream.stream).__name__ != want:
                    raise PeerError(f"{name}: the stream went over {type(stream.stream).__name__}, not {want}")
                streams[name] = stream
            streams["tcp"] = FramedStream(_Tcp(await trio.open_tcp_stream("127.0.0.1", tcp_port)))
            rows: dict[str, list[tuple[float, float]]] = {k: [] for k in streams}
            for stream in streams.values():  # warm up
                await _round_trips(stream, hidden, 50)
            for i in range(rounds):
                progress("round trips", i, rounds)
                for name, stream in streams.items():
                    rows[name].append(await _round_trips(stream, hidden, round_trips))
            progress("round trips", rounds, rounds)
            for stream in streams.values():
                await stream.close()
            nursery.cancel_scope.cancel()
            return rows

    rows = trio.run(run)
    out: dict[str, Any] = {"hidden": hidden, "body_bytes": hidden * 4, "round_trips": round_trips, "rounds": rounds}
    for name, values in rows.items():
        out[name] = {"wall_ms": statistics.median(v[0] for v in values),
                     "cpu_ms": statistics.median(v[1] for v in values)}
    return out
