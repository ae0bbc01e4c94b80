"""Fuzzing a live swarm: real `join` and `bootstrap` processes on 127.0.0.1 and the built-in model,
attacked class by class (malformed frames, hostile records, a client hoarding a server). After each
class the servers are alive, their memory is bounded, and a normal chat still equals `chat --local`.

Frames and records come from hypothesis; every attack is bounded in count and time and goes to
loopback only."""

from __future__ import annotations

import json
import math
import subprocess
import time

import psutil
import pytest
import torch
import trio
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from libp2p.crypto.ed25519 import create_new_key_pair
from llmswarm.bench.local_swarm import llmswarm_command
from llmswarm.node import config
from llmswarm.node.discovery.records import ServerRecord, sign_record
from llmswarm.node.errors import ErrorCode, RemoteError
from llmswarm.node.host import ephemeral_host, quiet_libp2p_logging
from llmswarm.node.identity import peer_id_of
from llmswarm.node.wire.codec import PREFIX, MsgType
from llmswarm.node.wire.messages import Error, Open, Opened, Step
from llmswarm.node.wire.records import Ack, RecordPut

pytestmark = pytest.mark.slow
quiet_libp2p_logging()
MODEL = "smollm2-135m"
PROMPT = "What is the capital of France?"
HIDDEN = 576
# What a server may hold beyond its weights and cache pool under any attack (the target).
RSS_MARGIN_BYTES = 256 * 2**20
# Few examples of many attacks each (every example ends with a chat); no shrinking: a failure prints
# its example as it is, which is enough to replay it, and shrinking would restart the swarm's clock.
FUZZ = settings(max_examples=2, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                phases=(Phase.explicit, Phase.generate))


def _chat(*args: str) -> list[int]:
    res = subprocess.run(llmswarm_command("chat", "-p", PROMPT, "--json", "-n", "24", *args),
                         capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout)["token_ids"]


@pytest.fixture(scope="module")
def swarm(swarm3, local_answer):
    """The session's shared swarm (conftest.py): servers 0:10, 10:20, 20:30."""
    swarm3.local_tokens = local_answer["token_ids"]
    swarm3.rss_at_start = [psutil.Process(p.pid).memory_info().rss for p in swarm3.servers]
    return swarm3


def _after_attack(swarm) -> None:
    """The servers survived, hold no more memory than they may, and still answer like the local model."""
    for i, proc in enumerate(swarm.servers):
        assert proc.poll() is None, f"server {i} died"
        rss = psutil.Process(proc.pid).memory_info().rss
        assert rss < swarm.rss_at_start[i] + RSS_MARGIN_BYTES, f"server {i} grew {rss - swarm.rss_at_start[i]} bytes"
    assert _chat("--peers", swarm.peers[0]) == swarm.local_tokens


def _attack(swarm, fn) -> None:
    async def main():
        async with ephemeral_host() as host:
            ready = swarm.ready[0]
            await host.connect_any(ready["peer_id"], ready["addrs"], deadline_s=10)
            with trio.fail_after(120):
                await fn(host, ready["peer_id"])

    trio.run(main)


# -- frames ------------------------------------------------------------------------------------------
json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False)
                           | st.text(max_size=20), lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
step_headers = st.fixed_dictionaries({"seq": json_values, "position": json_values | st.integers(-5, 2**40),
                                      "tensor": json_values | st.fixed_dictionaries({
                                          "dtype": st.sampled_from(["float32", "bfloat16", "int64", "x"]),
                                          "shape": st.lists(st.integers(-2, 70), max_size=4)})})
raw_frames = st.tuples(st.integers(0, 255), st.dictionaries(st.text(max_size=10), json_values, max_size=5)
                       | step_headers, st.binary(max_size=2048))


def _raw(mtype: int, header: dict | bytes, body: bytes) -> bytes:
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    return PREFIX.pack(b"LS", config.WIRE_VERSION, mtype, len(head), len(body)) + head + body


def test_malformed_frames_are_answered_and_the_server_stays_healthy(swarm):
    @given(frames=st.lists(raw_frames, min_size=25, max_size=25))
    @FUZZ
    def attack(frames):
        _attack(swarm, lambda host, peer: _send_frames(host, peer, frames))

    attack()
    _after_attack(swarm)  # once per class of attack


async def _send_frames(host, peer, frames):
    async def session():
        stream = await host.open_stream(peer, config.PROTOCOL_INFERENCE)
        assert Opened.from_frame(await stream.request(Open(MODEL, 0, 10, 64).to_frame())).max_length == 64
        return stream

    stream, codes = await session(), []
    for mtype, header, body in frames:  # inside a session: each is answered (or ends only its stream)
        if mtype in (MsgType.CLOSE, MsgType.LINK):
            continue  # a CLOSE ends the session by design; LINKs have their own tests
        try:
            await stream.stream.write(_raw(mtype, header, body))
            reply = await stream.recv(timeout_s=10)
        except Exception:  # noqa: BLE001 - the server ended this stream (an unknown type, a bad prefix)
            stream = await session()
            continue
        assert reply.type in (MsgType.ERROR, MsgType.OUTPUT), reply.type
        if reply.type == MsgType.ERROR:
            codes.append(Error.from_frame(reply).code)
    assert codes and set(codes) <= {ErrorCode.BAD_REQUEST, ErrorCode.TOO_LONG, ErrorCode.CACHE_FULL}
    # deeply nested JSON, a body on a control frame: the request's fault, never `internal`
    for header, body in [(b'{"a":' + b"[" * 30000 + b"]" * 30000 + b"}", b""), ({}, b"x" * 100)]:
        fresh = await host.open_stream(peer, config.PROTOCOL_INFERENCE)
        await fresh.stream.write(_raw(MsgType.OPEN, header, body))
        with pytest.raises(RemoteError) as err:
            Error.raise_if(await fresh.recv(timeout_s=10))
        assert err.value.code is ErrorCode.BAD_REQUEST
    stream = await session()
    await stream.send(Step(1, 2**31, torch.zeros(1, 1, HIDDEN)).to_frame())  # an absurd position
    assert Error.from_frame(await stream.recv(timeout_s=10)).code is ErrorCode.BAD_REQUEST



# -- records -----------------------------------------------------------------------------------------
finite = st.floats(min_value=-1e13, max_value=1e13, allow_nan=False)
records = st.fixed_dictionaries({
    "num_blocks": st.integers(-1, 40), "start": st.integers(-1, 35), "end": st.integers(-1, 40),
    "inference_rps": finite | st.just(1e12), "throughput": finite, "state": st.sampled_from(["online", "gone"]),
    "model": st.sampled_from([MODEL, "other-model", "x" * 300]),
    "addrs": st.lists(st.sampled_from(["/ip4/127.0.0.1/tcp/1", "/ip4/10.9.9.9/tcp/4001", "garbage"]), max_size=20),
})


def test_hostile_records_are_dropped_one_by_one(swarm):
    """Validly signed records that lie (a span past the model, no or absurd speed, addresses that never
    answer, many models for one key) are refused or dropped; none of them breaks a chat or a route."""

    @given(batch=st.lists(records, min_size=20, max_size=20))
    @FUZZ
    def attack(batch):
        _attack(swarm, lambda host, _peer: _put_records(host, swarm, batch))

    attack()
    res = subprocess.run(llmswarm_command("route", "--model", MODEL, "--peers", swarm.peers[0], "--json"),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    _after_attack(swarm)


async def _put_records(host, swarm, batch):
    key = create_new_key_pair()
    boot = swarm.peers[0]
    bootstrap_id = await host.connect(boot)
    for i, fields in enumerate(batch):
        addrs = [f"{a}/p2p/{peer_id_of(key)}" for a in fields.pop("addrs") if a != "garbage"]
        record = ServerRecord(peer_id=peer_id_of(key), addrs=addrs, seq=time.time_ns() + i,
                              expires_at=time.time() + 30, **fields)
        try:
            data = sign_record(record, key.private_key)
        except Exception:  # noqa: BLE001 - a record even the signer refuses never reaches the wire
            continue
        stream = await host.open_stream(bootstrap_id, config.PROTOCOL_RECORDS)
        try:
            added = Ack.from_frame(await stream.request(RecordPut(data).to_frame())).added
        except RemoteError as e:
            assert e.code is ErrorCode.BAD_RECORD
            added = False
        await stream.close()
        if not 0 <= fields["inference_rps"] <= config.MAX_RECORD_RATE or len(fields["model"]) > 256:
            assert not added, fields  # out of bounds: refused whatever else it says


# -- a client that hoards a server -------------------------------------------------------------------
def test_hoarding_client_leaves_others_a_share(swarm):
    """One client opens as many sessions as it can, fills its share of the cache, and leaves a STEP
    one byte short on each; another client's chat is unaffected."""

    async def fn(host, peer):
        held = []
        for _ in range(config.DEFAULT_MAX_SESSIONS + 4):
            stream = await host.open_stream(peer, config.PROTOCOL_INFERENCE)
            try:
                Opened.from_frame(await stream.request(Open(MODEL, 0, 10, 2048).to_frame()))
            except RemoteError as e:
                assert e.code is ErrorCode.BUSY and "your share" in str(e)
                break
            held.append(stream)
        assert len(held) == math.ceil(config.DEFAULT_MAX_SESSIONS * config.PEER_SHARE)
        for i, stream in enumerate(held):
            await stream.send(Step(i, 0, torch.zeros(1, 2048 if i == 0 else 8, HIDDEN)).to_frame())
            reply = await stream.recv(timeout_s=60)
            if reply.type == MsgType.ERROR:
                assert Error.from_frame(reply).code is ErrorCode.CACHE_FULL
        for stream in held:  # a step one byte short on every session, then silence
            shape = [1, 2000, HIDDEN]  # 4.6 MB, as big as a 2048-token session may send
            data = _raw(MsgType.STEP, {"seq": 9, "position": 0, "tensor": {"dtype": "float32", "shape": shape}},
                        bytes(math.prod(shape) * 4))
            await stream.stream.write(data[:-1])
        assert _chat_in_thread(swarm) == swarm.local_tokens  # while the hoard is held
        for stream in held:
            await stream.reset()

    _attack(swarm, fn)
    _after_attack(swarm)


def _chat_in_thread(swarm) -> list[int]:
    return _chat("--peers", swarm.peers[0])


def test_prompt_longer_than_max_length_is_refused_before_any_server(swarm):
    res = subprocess.run(llmswarm_command("chat", "-p", "word " * 600, "--max-length", "256", "--peers",
                                          swarm.peers[0]), capture_output=True, text=True, timeout=120)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1 and "--max-length is 256" in lines[0]
    res = subprocess.run(llmswarm_command("chat", "-p", PROMPT, "--max-length", "40", "-n", "200", "--json",
                                          "--peers", swarm.peers[0]), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    answer = json.loads(res.stdout)
    assert answer["prompt_tokens"] + answer["new_tokens"] <= 40 and answer["new_tokens"] > 0  # the answer so far
    assert "may stop early" in res.stderr

