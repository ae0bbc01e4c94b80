"""What this client has seen of each server, kept across runs: output checks passed and failed, and
the speed of the decode steps it measured (node/client/observed.py).

One JSON file (`config.default_reputation_path()`, next to the identity keys). Several clients may
run at once: each keeps what it learned since it loaded, and on save adds it to what is on disk
under an exclusive lock (counts add up, the newest speed wins), then replaces the file atomically.
The route solver reads it through `annotate()`: a distrusted server is excluded, a measured one is
routed on its measured speed, a server never seen is neutral (routed on what it announces).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from llmswarm.node import config
from llmswarm.routing import Snapshot


@dataclass
class PeerTrust:
    passed: int = 0  # output checks it agreed in
    failed: int = 0  # output checks it was found wrong in (by a majority)
    block_s: float | None = None  # measured seconds per block of one decode step (running average)
    samples: int = 0  # measured decode steps
    announced_rps: float | None = None  # what it announced when last measured
    last_seen: float = 0.0  # unix time of the last update

    @property
    def observed_rps(self) -> float | None:
        """Measured decode steps per second per block, once there are enough samples to trust it."""
        if self.block_s is None or self.samples < config.OBSERVED_MIN_SAMPLES:
            return None
        return 1.0 / self.block_s

    @property
    def distrusted(self) -> str | None:
        checks = self.passed + self.failed
        if self.failed >= config.DISTRUST_MIN_FAILED and self.failed > config.DISTRUST_FAILED_SHARE * checks:
            return f"failed {self.failed} of {checks} output checks"
        return None

    @property
    def verdict(self) -> str:
        return "distrusted" if self.distrusted else ("trusted" if self.passed else "neutral")


class Reputation:
    """Per peer id; `path` None keeps it in memory only."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.peers: dict[str, PeerTrust] = _read(path) if path is not None else {}
        self._base = {p: replace(t) for p, t in self.peers.items()}  # as loaded: what we add is the difference

    @classmethod
    def load(cls, path: Path | None = None) -> Reputation:
        return cls(path or config.default_reputation_path())

    def get(self, peer_id: str) -> PeerTrust:
        return self.peers.get(peer_id) or PeerTrust()

    def _entry(self, peer_id: str) -> PeerTrust:
        entry = self.peers.setdefault(peer_id, PeerTrust())
        entry.last_seen = time.time()
        return entry

    # -- what the client learns ------------------------------------------------------------------
    def checked(self, peer_id: str, passed: bool) -> None:
        entry = self._entry(peer_id)
        if passed:
            entry.passed += 1
        else:
            entry.failed += 1

    def measured(self, peer_id: str, block_s: float, announced_rps: float | None = None) -> None:
        """One decode step took `block_s` seconds per block on this server (network excluded)."""
        entry = self._entry(peer_id)
        a = config.OBSERVED_ALPHA
        entry.block_s = block_s if entry.block_s is None else entry.block_s + a * (block_s - entry.block_s)
        entry.samples += 1
        if announced_rps is not None:
            entry.announced_rps = announced_rps

    # -- what the route solver sees --------------------------------------------------------------
    def annotate(self, snapshot: Snapshot) -> Snapshot:
        """Measured speed in place of the claims, distrust as an exclusion; unknown servers as they are."""
        for s in snapshot.servers:
            entry = self.peers.get(s.peer_id)
            if entry is not None:
                s.observed_rps = entry.observed_rps
                s.distrusted = entry.distrusted
        return snapshot

    def summary(self, peer_id: str) -> dict[str, Any]:
        """What `status --json` and `route --json` show of one server."""
        e = self.get(peer_id)
        return {"verdict": e.verdict, "checks_passed": e.passed, "checks_failed": e.failed,
                "measured_rps": e.observed_rps, "measured_steps": e.samples, "why": e.distrusted}

    def as_dict(self) -> dict[str, dict[str, Any]]:
        return {p: {**asdict(t), "verdict": t.verdict, "observed_rps": t.observed_rps} for p, t in self.peers.items()}

    # -- the file --------------------------------------------------------------------------------
    def save(self) -> None:
        """Add what this process learned to the file (others may have written since we loaded)."""
        if self.path is None:
            return
        with _locked(self.path):
            disk = _read(self.path)
            for peer, ours in self.peers.items():
                base = self._base.get(peer, PeerTrust())
                if ours == base:
                    continue
                merged = disk.get(peer, PeerTrust())
                merged.passed += ours.passed - base.passed
                merged.failed += ours.failed - base.failed
                if ours.samples != base.samples:
                    merged.block_s, merged.announced_rps = ours.block_s, ours.announced_rps
                    merged.samples += ours.samples - base.samples
                merged.last_seen = max(merged.last_seen, ours.last_seen)
                disk[peer] = merged
            _write(self.path, disk)
        self.peers = disk
        self._base = {p: replace(t) for p, t in disk.items()}

    def clear(self, peer_id: str | None = None) -> int:
        """Forget one peer (or all): returns how many entries went. Written at once."""
        if self.path is None:
            gone = len(self.peers) if peer_id is None else int(self.peers.pop(peer_id, None) is not None)
            if peer_id is None:
                self.peers.clear()
            return gone
        with _locked(self.path):
            disk = _read(self.path)
            if peer_id is None:
                gone, disk = len(disk), {}
            else:
                gone = int(disk.pop(peer_id, None) is not None)
            _write(self.path, disk)
        self.peers, self._base = disk, {p: replace(t) for p, t in disk.items()}
        return gone


def _read(path: Path) -> dict[str, PeerTrust]:
    """The file's entries; a missing or unreadable file is an empty record (it is only a cache of
    what we measured: losing it costs a few checks), an entry that does not parse is skipped."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    peers = data.get("peers") if isinstance(data, dict) else None
    out: dict[str, PeerTrust] = {}
    for peer, raw in (peers or {}).items():
        if isinstance(peer, str) and isinstance(raw, dict):
            with contextlib.suppress(TypeError, ValueError):
                entry = PeerTrust(passed=int(raw.get("passed", 0)), failed=int(raw.get("failed", 0)),
                                  block_s=_maybe_float(raw.get("block_s")), samples=int(raw.get("samples", 0)),
                                  announced_rps=_maybe_float(raw.get("announced_rps")),
                                  last_seen=float(raw.get("last_seen", 0.0)))
                if entry.passed >= 0 and entry.failed >= 0 and (entry.block_s is None or entry.block_s > 0):
                    out[peer] = entry
    return out


def _maybe_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _write(path: Path, peers: dict[str, PeerTrust]) -> None:
    keep = sorted(peers.items(), key=lambda kv: -kv[1].last_seen)[: config.MAX_REPUTATION_PEERS]
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"format": "llmswarm.reputation/1",
                               "peers": {p: asdict(t) for p, t in keep}}, indent=1) + "\n")
    os.replace(tmp, path)


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path.with_name(path.name + ".lock"), os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
