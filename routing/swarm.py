"""Swarm snapshot records, their JSON form, and the routes the solvers return.

A snapshot is what a client knows about the swarm at one moment: which servers hold which span of
blocks, how fast they are, how much cache room they have, and the round-trip times it measured.
The JSON form (see routing/SNAPSHOT.md) lets any route be reproduced: `llmswarm route --dump` writes
it, `--snapshot` reads it back. Input is validated here, once; the solvers then trust it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import RoutingError

SNAPSHOT_FORMAT = "llmswarm.snapshot/1"
REACHES = ("direct", "relayed", "hole-punched")


@dataclass
class ServerInfo:
    """One server and the span [start, end) of blocks it hosts (end exclusive)."""

    peer_id: str
    start: int
    end: int
    inference_rps: float  # decode steps per second for ONE block: a block costs 1/inference_rps s
    throughput: float  # announced tokens/s the whole server sustains (the chain's bottleneck)
    cache_tokens_left: int | None = None  # free KV-cache tokens; None = unknown (assumed enough)
    rtt_s: float | None = None  # client <-> this server round trip, s; None = not measured
    next_rtts: dict[str, float] = field(default_factory=dict)  # peer_id -> measured RTT, s
    public_name: str | None = None
    region: str | None = None  # key into Snapshot.region_rtts, used where no RTT was measured
    availability: float = 1.0  # probability it stays up for the session; risk = -log(availability)
    quant: str = "none"  # how its weights are stored: "none" (exact), "int8", "nf4", ...
    reach: str = "direct"  # how the client reaches it: "direct", "relayed" (circuit relay), "hole-punched"
    # What the client measured itself (node/client/observed.py), in place of the server's claims once
    # it has enough samples: decode steps per second per block. None = not measured (announced used).
    observed_rps: float | None = None
    distrusted: str | None = None  # why the client no longer trusts it (failed output checks): excluded

    @property
    def rps(self) -> float:
        """Decode steps per second per block as routed on: measured when measured, else announced."""
        return self.observed_rps if self.observed_rps is not None else self.inference_rps

    @property
    def routed_throughput(self) -> float:
        """Tokens/s as routed on: one measured decode step through the whole span when measured."""
        return self.observed_rps / self.length if self.observed_rps is not None else self.throughput

    @property
    def exact_weights(self) -> bool:
        return self.quant == "none"

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass
class Snapshot:
    """The swarm as one client sees it: num_blocks blocks and the servers hosting them."""

    num_blocks: int
    servers: list[ServerInfo]
    model: str = ""
    region_rtts: dict[str, dict[str, float]] = field(default_factory=dict)  # region -> region -> s

    def validate(self) -> Snapshot:
        """Raise RoutingError on anything a solver could not trust; return self."""
        if not isinstance(self.num_blocks, int) or self.num_blocks <= 0:
            raise RoutingError(f"snapshot num_blocks must be a positive integer, got {self.num_blocks!r}")
        seen: set[str] = set()
        for s in self.servers:
            where = f"server {s.peer_id!r}"
            if s.peer_id in seen:
                raise RoutingError(f"snapshot lists {where} twice; keep one span per peer")
            seen.add(s.peer_id)
            if not 0 <= s.start < s.end <= self.num_blocks:
                raise RoutingError(f"{where} has span [{s.start}, {s.end}) outside 0..{self.num_blocks}")
            if not (_finite(s.inference_rps) and s.inference_rps > 0):
                raise RoutingError(f"{where} needs inference_rps > 0, got {s.inference_rps!r}")
            if not (_finite(s.throughput) and s.throughput >= 0):
                raise RoutingError(f"{where} needs throughput >= 0, got {s.throughput!r}")
            if s.rtt_s is not None and not (_finite(s.rtt_s) and s.rtt_s >= 0):
                raise RoutingError(f"{where} has a bad rtt_s {s.rtt_s!r}")
            if s.observed_rps is not None and not (_finite(s.observed_rps) and s.observed_rps > 0):
                raise RoutingError(f"{where} needs observed_rps > 0, got {s.observed_rps!r}")
            if not (_finite(s.availability) and 0 < s.availability <= 1):
                raise RoutingError(f"{where} needs 0 < availability <= 1, got {s.availability!r}")
            for peer, rtt in s.next_rtts.items():
                if not (_finite(rtt) and rtt >= 0):
                    raise RoutingError(f"{where} has a bad RTT {rtt!r} to {peer!r}")
        for a, row in self.region_rtts.items():
            for b, rtt in row.items():
                if not (_finite(rtt) and rtt >= 0):
                    raise RoutingError(f"region_rtts[{a!r}][{b!r}] = {rtt!r} is not a duration in seconds")
        return self

    # --- JSON -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        servers = []
        for s in self.servers:
            rec: dict[str, Any] = {"peer_id": s.peer_id, "start": s.start, "end": s.end,
                                   "inference_rps": s.inference_rps, "throughput": s.throughput}
            for key in ("cache_tokens_left", "rtt_s", "public_name", "region", "observed_rps", "distrusted"):
                if getattr(s, key) is not None:
                    rec[key] = getattr(s, key)
            if s.next_rtts:
                rec["next_rtts"] = dict(s.next_rtts)
            if s.availability != 1.0:
                rec["availability"] = s.availability
            if s.quant != "none":
                rec["quant"] = s.quant
            if s.reach != "direct":
                rec["reach"] = s.reach
            servers.append(rec)
        return {"format": SNAPSHOT_FORMAT, "model": self.model, "num_blocks": self.num_blocks,
                "region_rtts": self.region_rtts, "servers": servers}

    @classmethod
    def from_dict(cls, data: Any) -> Snapshot:
        if not isinstance(data, dict):
            raise RoutingError("snapshot JSON must be an object with num_blocks and servers")
        fmt = data.get("format", SNAPSHOT_FORMAT)
        if fmt != SNAPSHOT_FORMAT:
            raise RoutingError(f"snapshot format {fmt!r} is not {SNAPSHOT_FORMAT!r}")
        num_blocks = _field(data, "num_blocks", int, "snapshot")
        raw_servers = _field(data, "servers", list, "snapshot")
        region_rtts = data.get("region_rtts") or {}
        if not isinstance(region_rtts, dict) or not all(isinstance(v, dict) for v in region_rtts.values()):
            raise RoutingError("snapshot region_rtts must map region -> {region: seconds}")
        servers = [_server_from_dict(rec, i) for i, rec in enumerate(raw_servers)]
        model = data.get("model", "")
        return cls(num_blocks=num_blocks, servers=servers, model=str(model),
                   region_rtts={str(a): {str(b): _num(v, f"region_rtts[{a}][{b}]") for b, v in row.items()}
                                for a, row in region_rtts.items()}).validate()

    def dumps(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def loads(cls, text: str) -> Snapshot:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RoutingError(f"snapshot is not valid JSON (line {exc.lineno}: {exc.msg})") from None
        return cls.from_dict(data)

    def dump(self, path: str | Path) -> None:
        Path(path).write_text(self.dumps() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Snapshot:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise RoutingError(f"cannot read snapshot {str(path)!r}: {exc.strerror}") from None
        return cls.loads(text)


@dataclass(frozen=True)
class Hop:
    """One server of a chain and the blocks [start, end) it runs for us (end exclusive)."""

    peer_id: str
    start: int
    end: int


@dataclass
class Route:
    """A chain of servers covering every block, with its objective values."""

    chain: list[Hop]
    latency_s: float  # one decode step, client -> chain -> client
    throughput: float  # min announced throughput over the chain's servers
    hops: int  # servers in the chain
    risk: float  # sum of -log(availability): failure risk of the chain

    def objectives(self, names: tuple[str, ...]) -> tuple[float, ...]:
        """Values to MINIMISE, in the order of names (throughput is negated)."""
        table = {"latency": self.latency_s, "throughput": -self.throughput,
                 "hops": float(self.hops), "risk": self.risk}
        return tuple(table[n] for n in names)


# --- validation helpers -----------------------------------------------------------------------
def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _num(x: Any, what: str) -> float:
    if not _finite(x):
        raise RoutingError(f"snapshot {what} must be a finite number, got {x!r}")
    return float(x)


def _field(rec: dict, key: str, kind: type, where: str) -> Any:
    if key not in rec:
        raise RoutingError(f"{where} is missing {key!r}")
    value = rec[key]
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise RoutingError(f"{where} field {key!r} must be an integer, got {value!r}")
    if kind is float:
        return _num(value, f"{where} field {key!r}")
    if not isinstance(value, kind):
        raise RoutingError(f"{where} field {key!r} must be a {kind.__name__}, got {value!r}")
    return value


def _server_from_dict(rec: Any, i: int) -> ServerInfo:
    where = f"servers[{i}]"
    if not isinstance(rec, dict):
        raise RoutingError(f"snapshot {where} must be an object")
    opt = {}
    if rec.get("cache_tokens_left") is not None:
        opt["cache_tokens_left"] = _field(rec, "cache_tokens_left", int, where)
    if rec.get("rtt_s") is not None:
        opt["rtt_s"] = _field(rec, "rtt_s", float, where)
    if rec.get("reach") is not None:
        if rec["reach"] not in REACHES:
            raise RoutingError(f"snapshot {where} reach must be one of {', '.join(REACHES)}, got {rec['reach']!r}")
        opt["reach"] = rec["reach"]
    if rec.get("observed_rps") is not None:
        opt["observed_rps"] = _field(rec, "observed_rps", float, where)
    for key in ("public_name", "region", "quant", "distrusted"):
        if rec.get(key) is not None:
            opt[key] = str(rec[key])
    if "availability" in rec:
        opt["availability"] = _field(rec, "availability", float, where)
    next_rtts = rec.get("next_rtts") or {}
    if not isinstance(next_rtts, dict):
        raise RoutingError(f"snapshot {where} next_rtts must map peer_id -> seconds")
    return ServerInfo(
        peer_id=str(_field(rec, "peer_id", str, where)),
        start=_field(rec, "start", int, where),
        end=_field(rec, "end", int, where),
        inference_rps=_field(rec, "inference_rps", float, where),
        throughput=_field(rec, "throughput", float, where),
        next_rtts={str(k): _num(v, f"{where} next_rtts[{k}]") for k, v in next_rtts.items()},
        **opt,
    )
