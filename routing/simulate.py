"""Synthetic swarms: heterogeneous GPUs, spans of varied length, continents, some full caches.

Deterministic for a given (servers, blocks, seed), so a simulated result can be reproduced; `--dump`
writes the snapshot for anyone else to replay.
"""

from __future__ import annotations

import numpy as np

from .errors import RoutingError
from .swarm import ServerInfo, Snapshot

# (name, decode steps/s for one block, announced tokens/s of the server, share of the swarm)
GPUS = [
    ("A100", 160.0, 900.0, 0.10),
    ("RTX4090", 120.0, 600.0, 0.20),
    ("RTX3090", 80.0, 380.0, 0.30),
    ("T4", 35.0, 120.0, 0.25),
    ("CPU", 6.0, 20.0, 0.15),
]
# continent -> (client RTT, s): the client sits in Europe
REGIONS = {"eu": 0.02, "us": 0.09, "asia": 0.22, "sa": 0.18}
REGION_RTTS = {  # one-way tables are symmetric; in-region RTT on the diagonal
    "eu": {"eu": 0.02, "us": 0.08, "asia": 0.2, "sa": 0.19},
    "us": {"us": 0.03, "asia": 0.15, "sa": 0.12},
    "asia": {"asia": 0.04, "sa": 0.3},
    "sa": {"sa": 0.04},
}
FULL_CACHE_SHARE = 0.05  # servers whose KV cache is full: they must never be chosen
MEASURED_NEXT = 3  # RTTs each server measured to servers holding the block where its span ends


# Bounds of a simulated swarm: well past any real one (petals' public swarm ~ 100 servers, BLOOM-176B
# 70 blocks), and small enough that the chain graph (servers x servers edges at worst) fits in memory.
MAX_SIMULATED_SERVERS = 20_000
MAX_SIMULATED_BLOCKS = 1_000


def parse_size(text: str) -> tuple[int, int]:
    """'500x80' -> (500, 80)."""
    try:
        servers, blocks = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise RoutingError(f"--simulate wants SERVERSxBLOCKS like 500x80, got {text!r}") from None
    if servers < 1 or blocks < 1:
        raise RoutingError(f"--simulate needs at least 1 server and 1 block, got {text!r}")
    if servers > MAX_SIMULATED_SERVERS or blocks > MAX_SIMULATED_BLOCKS:
        raise RoutingError(f"--simulate {text}: at most {MAX_SIMULATED_SERVERS} servers and {MAX_SIMULATED_BLOCKS} "
                           "blocks")
    return servers, blocks


def simulate_swarm(num_servers: int, num_blocks: int, seed: int = 0) -> Snapshot:
    rng = np.random.default_rng(seed)
    L = num_blocks
    gpu = rng.choice(len(GPUS), size=num_servers, p=[g[3] for g in GPUS])
    regions = list(REGIONS)
    region = rng.choice(len(regions), size=num_servers, p=[0.35, 0.35, 0.2, 0.1])
    # span length: 4%..50% of the model, skewed short; fast GPUs tend to host more blocks
    frac = rng.beta(1.5, 4.0, size=num_servers) * 0.5 + 0.04
    lengths = np.clip(np.round(frac * L * np.array([1.4, 1.2, 1.0, 0.8, 0.6])[gpu]), 1, L).astype(int)
    starts = rng.integers(0, L - lengths + 1)
    starts, lengths = _cover_gaps(starts, lengths, L, rng)
    n = len(starts)
    gpu = np.concatenate([gpu, rng.choice(len(GPUS), size=n - num_servers)])
    region = np.concatenate([region, rng.choice(len(regions), size=n - num_servers)])
    full = rng.random(n) < FULL_CACHE_SHARE
    servers = []
    for i in range(n):
        name, rps, thr, _ = GPUS[gpu[i]]
        reg = regions[region[i]]
        servers.append(ServerInfo(
            peer_id=f"sim{i:05d}", start=int(starts[i]), end=int(starts[i] + lengths[i]),
            inference_rps=round(float(rps * rng.uniform(0.7, 1.3)), 3),
            throughput=round(float(thr * rng.uniform(0.6, 1.4) / max(lengths[i], 1) * 10), 3),
            cache_tokens_left=0 if full[i] else int(rng.integers(2_000, 200_000)),
            rtt_s=round(float(REGIONS[reg] * rng.uniform(0.8, 1.5)), 5),
            public_name=f"{name}@{reg}", region=reg,
            availability=round(float(rng.uniform(0.9, 0.999)), 4),
        ))
    _measure_next(servers, rng)
    return Snapshot(num_blocks=L, servers=servers, model=f"sim-{num_servers}x{L}-seed{seed}",
                    region_rtts=REGION_RTTS).validate()


def _cover_gaps(starts, lengths, L, rng):
    """Add servers over uncovered blocks, so every simulated swarm has a route (before exclusions)."""
    covered = np.zeros(L, dtype=bool)
    for s, n in zip(starts, lengths, strict=True):
        covered[s : s + n] = True
    extra_s, extra_n = [], []
    b = 0
    while b < L:
        if covered[b]:
            b += 1
            continue
        n = int(min(L - b, rng.integers(max(L // 10, 1), max(L // 4, 2))))
        extra_s.append(b)
        extra_n.append(n)
        b += n
    return (np.concatenate([starts, np.array(extra_s, int)]),
            np.concatenate([lengths, np.array(extra_n, int)]))


def _measure_next(servers: list[ServerInfo], rng) -> None:
    """Each server pings a few servers that hold the block where its span ends (as petals does)."""
    by_block: dict[int, list[ServerInfo]] = {}
    for s in servers:
        for b in (s.start,):  # only spans starting right at our end are cheap to find; enough here
            by_block.setdefault(b, []).append(s)
    for s in servers:
        nxt = by_block.get(s.end, [])
        for t in (nxt[i] for i in rng.permutation(len(nxt))[:MEASURED_NEXT]):
            base = REGION_RTTS.get(s.region, {}).get(t.region) or REGION_RTTS[t.region][s.region]
            s.next_rtts[t.peer_id] = round(float(base * rng.uniform(0.7, 1.3)), 5)
