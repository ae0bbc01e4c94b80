"""Signed announcements: forged, mismatched, expired, malformed and stale records are rejected."""

import base64
import dataclasses
import json
import time

import pytest
from libp2p.crypto.ed25519 import create_new_key_pair
from llmswarm.node.discovery.records import RecordStore, ServerRecord, sign_record, verify_record
from llmswarm.node.errors import WireError
from llmswarm.node.identity import peer_id_of


def make(kp, **changes):
    pid = peer_id_of(kp)
    base = ServerRecord(
        peer_id=pid,
        model="smollm2-135m",
        num_blocks=30,
        start=0,
        end=15,
        addrs=[f"/ip4/127.0.0.1/tcp/1/p2p/{pid}"],
        inference_rps=120.5,
        next_rtts={"x": 0.001},
        health={"cpu": 0.5},
        version="0.1.0",
        dtype="float32",
    )
    return dataclasses.replace(base.stamped(60), **changes)


def test_round_trip():
    kp = create_new_key_pair()
    rec = make(kp)
    assert verify_record(sign_record(rec, kp.private_key)) == rec


def _tamper(data: bytes, **record_changes) -> bytes:
    env = json.loads(data)
    rec = json.loads(env["record"])
    rec.update(record_changes)
    env["record"] = json.dumps(rec, sort_keys=True, separators=(",", ":"))
    return json.dumps(env).encode()


def test_forged_signature_rejected():
    kp = create_new_key_pair()
    data = sign_record(make(kp), kp.private_key)
    with pytest.raises(WireError, match="signature"):
        verify_record(_tamper(data, end=30))  # content changed after signing
    env = json.loads(data)
    env["sig"] = base64.b64encode(bytes(64)).decode()
    with pytest.raises(WireError, match="signature"):
        verify_record(json.dumps(env).encode())


def test_peer_id_must_match_signing_key():
    alice, mallory = create_new_key_pair(), create_new_key_pair()
    with pytest.raises(WireError):  # the signer refuses to sign someone else's record
        sign_record(make(alice), mallory.private_key)
    # a forger who builds the envelope by hand: valid signature, wrong identity
    rec = make(alice)
    body = rec.to_json()
    from llmswarm.node.discovery.records import DOMAIN

    env = {
        "v": 1,
        "record": body.decode(),
        "key": base64.b64encode(mallory.public_key.serialize()).decode(),
        "sig": base64.b64encode(mallory.private_key.sign(DOMAIN + body)).decode(),
    }
    with pytest.raises(WireError, match="peer_id does not match"):
        verify_record(json.dumps(env).encode())


def test_expired_and_far_future_rejected():
    kp = create_new_key_pair()
    data = sign_record(make(kp, expires_at=time.time() + 10), kp.private_key)
    verify_record(data)
    with pytest.raises(WireError, match="expired"):
        verify_record(data, now=time.time() + 11)
    with pytest.raises(WireError, match="future"):
        verify_record(sign_record(make(kp, expires_at=time.time() + 10**6), kp.private_key))


@pytest.mark.parametrize(
    "changes",
    [
        {"start": 15, "end": 15},
        {"end": 31},
        {"start": -1},
        {"num_blocks": 0},
        {"start": True},
        {"state": "weird"},
        {"inference_rps": -1.0},
        {"model": ""},
        {"model": "m" * 1000},
        {"addrs": ["a"] * 100},
        {"addrs": "x"},
        {"next_rtts": {"p": "fast"}},
        {"health": {"x": "y" * 10000}},
        {"sessions": 1.5},
        {"seq": -5},
    ],
)
def test_insane_fields_rejected(changes):
    kp = create_new_key_pair()
    try:
        data = sign_record(make(kp, **changes), kp.private_key)
    except (WireError, ValueError):
        return  # refused already at signing (size or JSON)
    with pytest.raises(WireError):
        verify_record(data)


def test_garbage_rejected():
    for data in (
        b"",
        b"not json",
        b"[]",
        b'{"v":2}',
        b'{"v":1,"record":"x","key":"!!","sig":"a"}',
        b"x" * 20000,
    ):
        with pytest.raises(WireError):
            verify_record(data)


def test_store_keeps_newest_seq_and_drops_expired():
    kp, other = create_new_key_pair(), create_new_key_pair()
    store = RecordStore()
    old = make(kp, seq=100, end=10)
    new = make(kp, seq=200, end=20)
    assert store.add(sign_record(old, kp.private_key))
    assert store.add(sign_record(new, kp.private_key))
    assert not store.add(sign_record(old, kp.private_key))  # older seq dropped
    assert not store.add(sign_record(new, kp.private_key))  # equal seq dropped
    assert [r.end for r in store.records("smollm2-135m")] == [20]
    assert store.add(sign_record(make(kp, model="other", seq=1), kp.private_key))  # per (model, peer)
    assert store.add(sign_record(make(other, seq=1, expires_at=time.time() + 1), other.private_key))
    assert len(store.records()) == 3 and len(store.envelopes("smollm2-135m")) == 2
    assert store.records("smollm2-135m", now=time.time() + 5) == [new]
    assert store.models() == ["other", "smollm2-135m"]
    with pytest.raises(WireError):
        store.add(b"junk")
