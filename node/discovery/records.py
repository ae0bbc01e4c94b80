"""Signed server announcements: "server X holds blocks start..end of model M until time T".

Each record is signed by the server's own libp2p key, carries its own expiry and a sequence number,
and is checked on every receipt (whatever path it came by: gossip, snapshot, direct put). This is
what the Kademlia DHT of py-libp2p could not give us (no per-record TTL, one value per key,
stale local reads, peers disagreeing on overwrites).

Envelope (JSON, <= config.MAX_RECORD_BYTES):
    {"v": 1, "record": "<canonical JSON of the record>", "key": "<b64 protobuf public key>",
     "sig": "<b64 Ed25519 signature over DOMAIN + record>"}
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any

from libp2p.crypto.keys import KeyType, PrivateKey
from libp2p.crypto.serialization import deserialize_public_key
from libp2p.peer.id import ID
from llmswarm.node import config
from llmswarm.node.errors import WireError

ENVELOPE_VERSION = 1
DOMAIN = b"llmswarm-server-record-v1\n"  # signatures cannot be replayed as another kind of message
STATES = ("joining", "online", "offline")
REACHES = ("direct", "relayed")
QUANT_NAME = re.compile(r"[a-z0-9_]{1,16}")  # not a fixed list: newer servers may announce new modes


@dataclass(frozen=True)
class ServerRecord:
    peer_id: str
    model: str  # registry name, e.g. "smollm2-135m"
    num_blocks: int  # the model's total number of blocks
    start: int  # first hosted block
    end: int  # one past the last hosted block
    addrs: list[str]  # full multiaddrs ending in /p2p/<peer_id>
    state: str = "online"  # "joining" | "online" | "offline"
    inference_rps: float = 0.0  # decode steps per second per block
    prefill_tps: float = 0.0  # prefill tokens per second
    throughput: float = 0.0  # announced chain throughput, tokens per second
    cache_tokens_left: int = 0
    sessions: int = 0
    version: str = ""  # llmswarm version string
    dtype: str = ""
    public_name: str = ""
    next_rtts: dict[str, float] = field(default_factory=dict)  # peer_id -> RTT seconds
    health: dict[str, Any] = field(default_factory=dict)  # free-form: GPU/CPU figures
    # How the span's linear weights are stored: "none" (full precision, in `dtype`), "int8", "nf4", or
    # a mode a newer version adds. Records from before this field read as "none".
    quant: str = "none"
    # How others reach it: "direct" (a dialable address), or "relayed" (behind NAT: its first
    # addresses are circuit addresses through a relay). Records from before this field read "direct".
    reach: str = "direct"
    relay_service: bool = False  # it offers circuit-relay reservations to servers behind NAT
    seq: int = 0  # strictly increasing per server (time_ns at creation)
    expires_at: float = 0.0  # unix seconds

    def to_json(self) -> bytes:
        return json.dumps(
            dataclasses.asdict(self), sort_keys=True, separators=(",", ":"), allow_nan=False
        ).encode()

    def stamped(
        self, ttl_s: float | None = None, *, now: float | None = None, **changes: Any
    ) -> ServerRecord:
        """A copy with a fresh seq (time_ns) and expiry `ttl_s` from now, plus any field `changes`."""
        ttl_s = config.ANNOUNCE_PERIOD_S * config.RECORD_TTL_FACTOR if ttl_s is None else ttl_s
        now = time.time() if now is None else now
        return dataclasses.replace(self, seq=time.time_ns(), expires_at=now + ttl_s, **changes)


def sign_record(record: ServerRecord, private_key: PrivateKey) -> bytes:
    """Signed envelope of `record`; the key must be the one `record.peer_id` derives from."""
    body = record.to_json()
    public = private_key.get_public_key()
    if ID.from_pubkey(public).to_base58() != record.peer_id:
        raise WireError("record.peer_id is not the peer id of the signing key")
    envelope = {
        "v": ENVELOPE_VERSION,
        "record": body.decode(),
        "key": base64.b64encode(public.serialize()).decode(),
        "sig": base64.b64encode(private_key.sign(DOMAIN + body)).decode(),
    }
    data = json.dumps(envelope, separators=(",", ":")).encode()
    if len(data) > config.MAX_RECORD_BYTES:
        raise WireError(
            f"signed record is {len(data)} bytes, above {config.MAX_RECORD_BYTES}: trim next_rtts/health"
        )
    return data


def verify_record(data: bytes, now: float | None = None) -> ServerRecord:
    """Check signature, signer == record.peer_id, expiry and field sanity; WireError otherwise."""
    if len(data) > config.MAX_RECORD_BYTES:
        raise WireError(f"signed record of {len(data)} bytes exceeds {config.MAX_RECORD_BYTES}")
    try:
        envelope = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise WireError("signed record is not JSON") from None
    if not isinstance(envelope, dict) or envelope.get("v") != ENVELOPE_VERSION:
        raise WireError("signed record has an unknown envelope version")
    body, key_b64, sig_b64 = envelope.get("record"), envelope.get("key"), envelope.get("sig")
    if not (isinstance(body, str) and isinstance(key_b64, str) and isinstance(sig_b64, str)):
        raise WireError("signed record lacks record, key or sig")
    try:
        public = deserialize_public_key(base64.b64decode(key_b64, validate=True))
        signature = base64.b64decode(sig_b64, validate=True)
    except (binascii.Error, ValueError, Exception):
        raise WireError("signed record carries an unreadable public key or signature") from None
    if public.get_type() != KeyType.Ed25519:
        raise WireError("signed record: only Ed25519 keys are accepted")
    body_bytes = body.encode()
    try:
        valid = public.verify(DOMAIN + body_bytes, signature)
    except Exception:
        valid = False
    if not valid:
        raise WireError("signed record: bad signature")
    try:
        fields = json.loads(body_bytes)
    except json.JSONDecodeError:
        raise WireError("signed record: record is not JSON") from None
    record = _record_from_dict(fields)
    if ID.from_pubkey(public).to_base58() != record.peer_id:
        raise WireError("signed record: peer_id does not match the signing key")
    now = time.time() if now is None else now
    if record.expires_at <= now:
        raise WireError("signed record has expired")
    if record.expires_at > now + config.MAX_RECORD_TTL_S + config.MAX_RECORD_CLOCK_SKEW_S:
        raise WireError("signed record expires too far in the future")
    return record


# -- validation ------------------------------------------------------------------------------------
def _int(v: Any, name: str, lo: int, hi: int) -> int:
    if type(v) is not int or not lo <= v <= hi:
        raise WireError(f"record field {name} must be an integer in [{lo}, {hi}]")
    return v


def _num(v: Any, name: str, hi: float = math.inf) -> float:
    if type(v) not in (int, float) or not math.isfinite(v) or not 0 <= v <= hi:
        raise WireError(f"record field {name} must be a number in [0, {hi:g}]")
    return float(v)


def _str(v: Any, name: str, *, nonempty: bool = False) -> str:
    if not isinstance(v, str) or len(v) > config.MAX_RECORD_STRING_CHARS or (nonempty and not v):
        raise WireError(
            f"record field {name} must be a string of at most {config.MAX_RECORD_STRING_CHARS} chars"
        )
    return v


def _record_from_dict(d: Any) -> ServerRecord:
    if not isinstance(d, dict):
        raise WireError("record must be a JSON object")
    known = {f.name for f in dataclasses.fields(ServerRecord)}
    d = {k: v for k, v in d.items() if k in known}  # newer versions may add fields: ignore them
    for required in ("peer_id", "model", "num_blocks", "start", "end", "addrs", "seq", "expires_at"):
        if required not in d:
            raise WireError(f"record lacks field {required}")
    big = 2**63 - 1
    n = _int(d["num_blocks"], "num_blocks", 1, config.MAX_RECORD_BLOCKS)
    start = _int(d["start"], "start", 0, n - 1)
    _int(d["end"], "end", start + 1, n)
    _str(d["peer_id"], "peer_id", nonempty=True)
    _str(d["model"], "model", nonempty=True)
    addrs = d["addrs"]
    if not isinstance(addrs, list) or len(addrs) > config.MAX_RECORD_ADDRS:
        raise WireError(f"record field addrs must be a list of at most {config.MAX_RECORD_ADDRS}")
    for a in addrs:
        _str(a, "addrs[]", nonempty=True)
    if d.get("state", "online") not in STATES:
        raise WireError(f"record field state must be one of {', '.join(STATES)}")
    for name in ("inference_rps", "prefill_tps", "throughput"):
        if name in d:
            d[name] = _num(d[name], name, config.MAX_RECORD_RATE)
    for name in ("cache_tokens_left", "sessions"):
        if name in d:
            _int(d[name], name, 0, big)
    for name in ("version", "dtype", "public_name"):
        if name in d:
            _str(d[name], name)
    if "quant" in d and (not isinstance(d["quant"], str) or not QUANT_NAME.fullmatch(d["quant"])):
        raise WireError("record field quant must be a short lowercase name such as none, int8 or nf4")
    if d.get("reach", "direct") not in REACHES:
        raise WireError(f"record field reach must be one of {', '.join(REACHES)}")
    if type(d.get("relay_service", False)) is not bool:
        raise WireError("record field relay_service must be true or false")
    rtts = d.get("next_rtts", {})
    if not isinstance(rtts, dict) or len(rtts) > config.MAX_RECORD_NEXT_RTTS:
        raise WireError(
            f"record field next_rtts must map at most {config.MAX_RECORD_NEXT_RTTS} peers to seconds"
        )
    d["next_rtts"] = {_str(k, "next_rtts key"): _num(v, "next_rtts value", config.MAX_RECORD_RTT_S)
                      for k, v in rtts.items()}
    health = d.get("health", {})
    if not isinstance(health, dict) or len(json.dumps(health)) > config.MAX_RECORD_HEALTH_BYTES:
        raise WireError(
            f"record field health must be an object of at most {config.MAX_RECORD_HEALTH_BYTES} bytes"
        )
    _int(d["seq"], "seq", 0, big)
    d["expires_at"] = _num(d["expires_at"], "expires_at")
    return ServerRecord(**d)


# -- store -----------------------------------------------------------------------------------------
class RecordStore:
    """Verified records, newest seq per (model, peer_id); expired ones vanish on read."""

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], tuple[ServerRecord, bytes]] = {}

    def add(self, data: bytes, now: float | None = None) -> bool:
        """Verify and keep `data` if it is newer than what we hold. False if older or equal.
        Raises WireError for an invalid record."""
        return self.put(data, now) is not None

    def put(self, data: bytes, now: float | None = None) -> ServerRecord | None:
        """Like `add`, but returns the record when it was kept, else None."""
        record = verify_record(data, now)
        key = (record.model, record.peer_id)
        held = self._entries.get(key)
        if held is not None and held[0].seq >= record.seq:
            return None
        if held is None and self._count(record.model) >= config.MAX_RECORDS_PER_MODEL:
            self._expire(now)
            if self._count(record.model) >= config.MAX_RECORDS_PER_MODEL:
                raise WireError(f"too many records for model {record.model}")
        if held is None and self._models_of(record.peer_id) >= config.MAX_MODELS_PER_PEER:
            self._expire(now)
            if self._models_of(record.peer_id) >= config.MAX_MODELS_PER_PEER:
                raise WireError(f"peer {record.peer_id[-8:]} already announces {config.MAX_MODELS_PER_PEER} models")
        self._entries[key] = (record, bytes(data))
        return record

    def records(self, model: str | None = None, now: float | None = None) -> list[ServerRecord]:
        self._expire(now)
        return [r for (m, _), (r, _) in self._entries.items() if model is None or m == model]

    def envelopes(self, model: str | None = None, now: float | None = None) -> list[bytes]:
        self._expire(now)
        return [e for (m, _), (_, e) in self._entries.items() if model is None or m == model]

    def models(self, now: float | None = None) -> list[str]:
        self._expire(now)
        return sorted({m for m, _ in self._entries})

    def _count(self, model: str) -> int:
        return sum(1 for m, _ in self._entries if m == model)

    def _models_of(self, peer_id: str) -> int:
        return sum(1 for _, p in self._entries if p == peer_id)

    def _expire(self, now: float | None) -> None:
        now = time.time() if now is None else now
        for key in [k for k, (r, _) in self._entries.items() if r.expires_at <= now]:
            del self._entries[key]
