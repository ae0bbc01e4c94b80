"""Wire codec and framed stream: round trips and every malformed input -> WireError."""

import json
import struct

import pytest
import torch
import trio
from llmswarm.node import config
from llmswarm.node.errors import ErrorCode, PeerClosed, PeerError, RemoteError, WireError
from llmswarm.node.wire.codec import (
    PREFIX,
    Frame,
    MsgType,
    decode_frame,
    decode_tensor,
    encode_frame,
    encode_tensor,
)
from llmswarm.node.wire.messages import Error, Output, Step
from llmswarm.node.wire.stream import FramedStream


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_tensor_round_trip_each_dtype(dtype):
    t = torch.randn(2, 3, 576).to(dtype)
    meta, body = encode_tensor(t)
    frame = decode_frame(bytearray(encode_frame(Frame(MsgType.STEP, {"hidden": meta, "pos": 7}, body))))
    assert frame.type == MsgType.STEP and frame.header["pos"] == 7
    out = decode_tensor(frame.header["hidden"], frame.body, expect_last_dim=576)
    assert out.dtype == dtype and torch.equal(out, t)
    assert torch.equal(decode_tensor(meta, bytes(body)), t)  # read-only bytes input works too


def test_non_contiguous_and_1d():
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()
    meta, body = encode_tensor(t)
    assert torch.equal(decode_tensor(meta, bytes(body)), t)
    meta, body = encode_tensor(torch.ones(5, dtype=torch.float16))
    assert meta == {"dtype": "float16", "shape": [5]}


def test_encode_refuses_other_dtypes():
    for t in (torch.ones(2, dtype=torch.int64), torch.ones(2, dtype=torch.float64), torch.tensor(1.0)):
        with pytest.raises(WireError):
            encode_tensor(t)


def test_tensors_the_fast_path_cannot_take_still_travel():
    # encode_tensor takes a decode step's tensor with one torch call and hands anything else to the
    # general path: a tensor that needs grad, a strided view, an expanded one
    for t in (torch.randn(1, 2, 8, requires_grad=True), torch.randn(1, 4, 8)[:, ::2],
              torch.randn(1, 1, 8).expand(1, 3, 8)):
        meta, body = encode_tensor(t)
        assert meta == {"dtype": "float32", "shape": list(t.shape)}
        assert torch.equal(decode_tensor(meta, bytearray(body)), t.detach())


def test_a_received_tensor_shares_the_frame_body():
    body = bytearray(encode_tensor(torch.zeros(1, 1, 4))[1])
    t = decode_tensor({"dtype": "float32", "shape": [1, 1, 4]}, body)
    body[:4] = struct.pack("<f", 2.5)
    assert t[0, 0, 0].item() == 2.5  # zero-copy: no second copy of every step's hidden states


@pytest.mark.parametrize("frame", [
    Step(3, 9, torch.randn(1, 2, 8)).to_frame(),
    Step(2**53 - 1, 4095, torch.randn(1, 1, 8).to(torch.bfloat16), relay=True).to_frame(),
    Output(5, torch.randn(1, 1, 8).to(torch.float16)).to_frame(),
    Output(6, torch.randn(1, 3, 8), relay_failed='next server said "no"\n').to_frame(),
    Step(1, 0, torch.randn(2, 8)).to_frame(),  # another rank
    Frame(MsgType.STEP, {"seq": 1, "position": 0, "tensor": {"dtype": "float32", "shape": [1, 1, 8]}, "relay": 1}),
    Frame(MsgType.STEP, {"seq": True, "position": 0, "tensor": {"dtype": "float32", "shape": [1, 1, 8]}}),
    Frame(MsgType.OUTPUT, {"seq": 1, "tensor": {"dtype": 'x"', "shape": [1, 1, 8]}}),
    Frame(MsgType.OUTPUT, {"seq": 1, "tensor": {"dtype": "float32", "shape": [1, 1, 8.0]}}),
    Frame(MsgType.OUTPUT, {"seq": 1, "tensor": {"dtype": "float32", "shape": [1, 1, 8], "x": 0}}),
])
def test_every_header_is_written_as_json_writes_it(frame):
    # STEP's and OUTPUT's usual headers come from a template (the codec's fast path); anything else,
    # or anything unusual in them, is json's to write: either way the bytes are json's
    expected = json.dumps(frame.header, separators=(",", ":")).encode()
    assert encode_frame(frame)[PREFIX.size : PREFIX.size + len(expected)] == expected
    assert decode_frame(bytearray(encode_frame(frame))).header == frame.header


@pytest.mark.parametrize(
    "meta, nbytes",
    [
        ({"dtype": "float64", "shape": [2]}, 16),  # unknown dtype
        ({"dtype": "float32", "shape": [2]}, 7),  # wrong body length
        ({"dtype": "float32", "shape": [-2]}, 8),  # negative dim
        ({"dtype": "float32", "shape": [0]}, 0),  # zero dim
        ({"dtype": "float32", "shape": [2.0]}, 8),  # float dim
        ({"dtype": "float32", "shape": [True]}, 4),  # bool dim
        ({"dtype": "float32", "shape": [2**40, 2**40]}, 8),  # huge dims
        ({"dtype": "float32", "shape": [1] * 9}, 4),  # rank too high
        ({"dtype": "float32", "shape": []}, 4),  # rank 0
        ({"dtype": "float32", "shape": "2"}, 8),  # not a list
        ({"shape": [2]}, 8),  # no dtype
        (["float32", [2]], 8),  # not an object
    ],
)
def test_decode_tensor_rejects(meta, nbytes):
    with pytest.raises(WireError):
        decode_tensor(meta, bytes(nbytes))


def test_decode_tensor_expect_last_dim():
    meta, body = encode_tensor(torch.ones(1, 1, 8))
    with pytest.raises(WireError, match="last dim"):
        decode_tensor(meta, body, expect_last_dim=9)


def _frame_bytes(**over):
    f = dict(magic=b"LS", version=config.WIRE_VERSION, type=int(MsgType.PING), hlen=2, blen=3)
    f.update(over)
    return PREFIX.pack(f["magic"], f["version"], f["type"], f["hlen"], f["blen"]) + b"{}" + b"abc"


@pytest.mark.parametrize(
    "data",
    [
        _frame_bytes(magic=b"XX"),
        _frame_bytes(version=config.WIRE_VERSION + 1),
        _frame_bytes(type=200),
        _frame_bytes(hlen=config.MAX_HEADER_BYTES + 1),
        _frame_bytes(blen=config.MAX_FRAME_BODY_BYTES + 1),
        _frame_bytes(blen=4),  # announced length differs from data
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # garbage
        b"\x00" * 5,  # too short
        PREFIX.pack(b"LS", config.WIRE_VERSION, int(MsgType.PING), 3, 0) + b"\xff\xfe\x00",  # header not UTF-8 JSON
        PREFIX.pack(b"LS", config.WIRE_VERSION, int(MsgType.PING), 2, 0) + b"[]",  # header not an object
    ],
)
def test_decode_frame_rejects(data):
    with pytest.raises(WireError):
        decode_frame(data)


def test_encode_frame_refuses_oversized_header():
    with pytest.raises(WireError):
        encode_frame(Frame(MsgType.PING, {"x": "a" * (config.MAX_HEADER_BYTES + 1)}))


def test_error_frame_raises_remote_error():
    with pytest.raises(RemoteError) as info:
        Error.raise_if(decode_frame(encode_frame(Error(ErrorCode.BUSY, "no cache left").to_frame())))
    assert info.value.code is ErrorCode.BUSY and info.value.code.transient and "no cache left" in str(info.value)
    pong = Frame(MsgType.PONG)
    assert Error.raise_if(pong) is pong


class _FakeStream:
    """A stream whose read(n) returns at most `chunk` bytes (like py-libp2p), then EOF or hangs."""

    def __init__(self, data: bytes, chunk: int = 5, then: str = "eof"):
        self.data, self.chunk, self.then, self.pos = data, chunk, then, 0
        self.read_calls = 0

    async def read(self, n):
        self.read_calls += 1
        if self.pos >= len(self.data):
            if self.then == "hang":
                await trio.sleep_forever()
            return b""
        out = self.data[self.pos : self.pos + min(n, self.chunk)]
        self.pos += len(out)
        return out


def test_recv_reads_in_pieces_and_detects_truncation(monkeypatch):
    monkeypatch.setattr(config, "FRAME_TIMEOUT_S", 0.5)  # a begun frame's bound (10 s): the stall below

    async def main():
        meta, body = encode_tensor(torch.randn(1, 1, 16))
        data = encode_frame(Frame(MsgType.OUTPUT, {"t": meta}, body))
        s = FramedStream(_FakeStream(data + data, chunk=7))
        for _ in range(2):
            f = await s.recv(timeout_s=1)
            assert f.type == MsgType.OUTPUT and decode_tensor(f.header["t"], f.body).shape == (1, 1, 16)
        with pytest.raises(PeerClosed):  # clean end between frames
            await s.recv(timeout_s=1)
        with pytest.raises(PeerError, match="mid-message"):  # cut inside the body
            await FramedStream(_FakeStream(data[:-3])).recv(timeout_s=1)
        with pytest.raises(PeerError, match="mid-message"):  # cut inside the prefix
            await FramedStream(_FakeStream(data[:5])).recv(timeout_s=1)
        with pytest.raises(PeerError, match="within 0.50"):  # stalls mid-frame: the begun frame's bound
            started = trio.current_time()
            await FramedStream(_FakeStream(data[:20], then="hang")).recv(timeout_s=0.2)
        assert 0.5 <= trio.current_time() - started < 2  # the begun frame's bound, not the first byte's

    trio.run(main)


def test_recv_rejects_oversized_frame_without_reading_body():
    async def main():
        data = struct.pack(">2sBBII", b"LS", config.WIRE_VERSION, int(MsgType.STEP), 2,
                           config.MAX_FRAME_BODY_BYTES + 1) + b"{}"
        fake = _FakeStream(data + b"x" * (4 * config.READ_CHUNK_BYTES), chunk=1 << 30)
        with pytest.raises(WireError, match="exceeds"):
            await FramedStream(fake).recv(timeout_s=1)
        assert fake.pos <= 12 + config.READ_CHUNK_BYTES  # read ahead at most one chunk, never the body

    trio.run(main)


def test_recv_takes_whole_frames_in_one_read():
    """Each yamux read sends a window update: a frame the transport already holds is one read."""
    async def main():
        meta, body = encode_tensor(torch.randn(1, 1, 576))
        data = encode_frame(Frame(MsgType.OUTPUT, {"t": meta}, body))
        fake = _FakeStream(data * 3, chunk=len(data))
        s = FramedStream(fake)
        for _ in range(3):
            assert (await s.recv(timeout_s=1)).type == MsgType.OUTPUT
        assert fake.read_calls == 3

    trio.run(main)


def test_switch_to_wakes_a_waiting_recv_onto_the_new_transport():
    async def main():
        data = encode_frame(Frame(MsgType.CLOSE))
        old, new = _FakeStream(b"", then="hang"), _FakeStream(data)
        s = FramedStream(old)
        got = []
        async with trio.open_nursery() as nursery:
            async def reader():
                got.append(await s.recv(timeout_s=5))
            nursery.start_soon(reader)
            await trio.sleep(0.05)  # the reader waits on the old transport
            s.switch_to(new)
        assert got[0].type == MsgType.CLOSE and s.direct and s.libp2p is old
        with pytest.raises(WireError):  # once only
            s.switch_to(_FakeStream(b""))

    trio.run(main)


def test_processes_that_carry_no_tensor_never_import_torch():
    """bootstrap, probe, status and route start 1.4 s sooner: torch comes with the first tensor."""
    probe = (
        "import sys\n"
        "import llmswarm.node.discovery.bootstrap, llmswarm.node.discovery.probe, llmswarm.node.discovery.status\n"
        "from llmswarm.node.wire.codec import decode_frame, decode_tensor, encode_frame\n"
        "from llmswarm.node.wire.messages import Ping\n"
        "Ping.from_frame(decode_frame(encode_frame(Ping(3).to_frame())))\n"
        "before = 'torch' in sys.modules\n"
        "t = decode_tensor({'dtype': 'bfloat16', 'shape': [1, 2]}, bytearray(4))\n"
        "print(before, 'torch' in sys.modules, t.dtype)\n"
    )
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["False", "True", "torch.bfloat16"]
