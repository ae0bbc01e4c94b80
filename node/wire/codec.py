"""Wire format v1: every byte llmswarm sends over the network is a frame built and checked here.

Frame = 12-byte fixed prefix, then a JSON header, then a raw body:

    magic b"LS" | version u8 | type u8 | header_len u32 BE | body_len u32 BE | header | body

The lengths make a truncated message detectable: py-libp2p reports a peer killed mid-reply as a
clean EOF (trap 2), so a reader that hits EOF before `12 + header_len + body_len` bytes raises
PeerError instead of returning a short reply. The prefix is validated before anything else is
read, so an oversized frame is refused without reading (or allocating) its body.

Tensors travel as raw little-endian bytes of a contiguous CPU tensor plus {"dtype", "shape"} in the
header; never pickle (a peer could run code on us).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import torch
import trio
from llmswarm.node import config
from llmswarm.node.errors import PeerClosed, PeerError, RemoteError, WireError

MAGIC = b"LS"
PREFIX = struct.Struct(">2sBBII")  # magic, version, type, header_len, body_len
PREFIX_BYTES = PREFIX.size  # 12


class MsgType(IntEnum):
    OPEN = 1
    OPENED = 2
    STEP = 3
    OUTPUT = 4
    CLOSE = 5
    CLOSED = 6
    ERROR = 7
    PING = 8
    PONG = 9
    RECORDS_GET = 10
    RECORDS = 11
    RECORD_PUT = 12
    ACK = 13
    LINK = 14  # client -> server: forward relayed steps' outputs to the next server's session
    LINKED = 15
    ATTACH = 16  # server -> next server: this stream feeds session <id> (relayed STEPs)
    ATTACHED = 17


_TYPES = frozenset(int(t) for t in MsgType)


@dataclass
class Frame:
    type: MsgType
    header: dict[str, Any] = field(default_factory=dict)
    body: bytes | bytearray | memoryview = b""


# --------------------------------------------------------------------------------------------------
# Frames <-> bytes
# --------------------------------------------------------------------------------------------------
def encode_frame(frame: Frame) -> bytes:
    """One contiguous buffer (prefix + header + body), so a frame is sent with one write."""
    header = (
        json.dumps(frame.header, separators=(",", ":"), allow_nan=False).encode() if frame.header else b""
    )
    if len(header) > config.MAX_HEADER_BYTES:
        raise WireError(f"frame header is {len(header)} bytes, above the {config.MAX_HEADER_BYTES} limit")
    body_len = memoryview(frame.body).nbytes
    if body_len > config.MAX_FRAME_BODY_BYTES:
        raise WireError(f"frame body is {body_len} bytes, above the {config.MAX_FRAME_BODY_BYTES} limit")
    prefix = PREFIX.pack(MAGIC, config.WIRE_VERSION, int(frame.type), len(header), body_len)
    return b"".join((prefix, header, frame.body))


def parse_prefix(prefix: bytes | bytearray) -> tuple[MsgType, int, int]:
    """Validate the 12-byte prefix: returns (type, header_len, body_len) or raises WireError."""
    if len(prefix) != PREFIX_BYTES:
        raise WireError(f"frame prefix is {len(prefix)} bytes, expected {PREFIX_BYTES}")
    magic, version, mtype, header_len, body_len = PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise WireError(f"bad magic {magic!r}: the peer does not speak the llmswarm wire format")
    if version != config.WIRE_VERSION:
        raise WireError(
            f"wire version {version} is not supported (this node speaks {config.WIRE_VERSION}): "
            "upgrade llmswarm"
        )
    if mtype not in _TYPES:
        raise WireError(f"unknown message type {mtype}")
    if header_len > config.MAX_HEADER_BYTES:
        raise WireError(f"frame header of {header_len} bytes exceeds the {config.MAX_HEADER_BYTES} limit")
    if body_len > config.MAX_FRAME_BODY_BYTES:
        raise WireError(f"frame body of {body_len} bytes exceeds the {config.MAX_FRAME_BODY_BYTES} limit")
    return MsgType(mtype), header_len, body_len


def parse_header(raw: bytes | bytearray) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WireError(f"frame header is not UTF-8 JSON: {e}") from None
    if not isinstance(header, dict):
        raise WireError("frame header must be a JSON object")
    return header


def decode_frame(data: bytes | bytearray) -> Frame:
    """Parse one whole frame held in memory (tests, gossip payloads); trailing bytes are an error."""
    mtype, header_len, body_len = parse_prefix(data[:PREFIX_BYTES])
    if len(data) != PREFIX_BYTES + header_len + body_len:
        raise WireError(
            f"frame is {len(data)} bytes, its prefix announces {PREFIX_BYTES + header_len + body_len}"
        )
    header = parse_header(data[PREFIX_BYTES : PREFIX_BYTES + header_len])
    return Frame(mtype, header, data[PREFIX_BYTES + header_len :])


# --------------------------------------------------------------------------------------------------
# Tensors
# --------------------------------------------------------------------------------------------------
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """The wire's name of a dtype it can carry (WireError for any other)."""
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        raise WireError(f"dtype {dtype} cannot be sent; allowed: {', '.join(DTYPES)}")
    return name


def encode_tensor(t: torch.Tensor) -> tuple[dict[str, Any], memoryview]:
    """(meta, body): body is a zero-copy view of the tensor's bytes (keep `t` alive until sent)."""
    name = dtype_name(t.dtype)
    if t.dim() == 0:
        raise WireError("0-dim tensors cannot be sent; reshape to [1]")
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    # bfloat16 has no numpy dtype: view the storage as bytes instead.
    body = memoryview(t.reshape(-1).view(torch.uint8).numpy())
    return {"dtype": name, "shape": list(t.shape)}, body


def decode_tensor(
    meta: Any,
    body: bytes | bytearray | memoryview,
    *,
    expect_last_dim: int | None = None,
    max_elems: int = config.MAX_TENSOR_ELEMS,
) -> torch.Tensor:
    """Validate meta against body and return a tensor.

    Zero-copy when `body` is writable (bytearray, as FramedStream.recv returns): the tensor then
    shares that buffer. A read-only `bytes` body is copied once.
    """
    if not isinstance(meta, dict):
        raise WireError("tensor meta must be an object with dtype and shape")
    dtype = DTYPES.get(meta.get("dtype")) if isinstance(meta.get("dtype"), str) else None
    if dtype is None:
        raise WireError(f"tensor dtype {meta.get('dtype')!r} is not allowed; allowed: {', '.join(DTYPES)}")
    shape = meta.get("shape")
    if not isinstance(shape, list) or not 1 <= len(shape) <= config.MAX_TENSOR_RANK:
        raise WireError(f"tensor shape must be a list of 1..{config.MAX_TENSOR_RANK} dims, got {shape!r}")
    for d in shape:
        if type(d) is not int or d <= 0:
            raise WireError(f"tensor shape {shape!r} must hold positive integers")
    elems = math.prod(shape)
    if elems > max_elems:
        raise WireError(f"tensor of {elems} elements exceeds the limit of {max_elems}")
    if expect_last_dim is not None and shape[-1] != expect_last_dim:
        raise WireError(f"tensor last dim is {shape[-1]}, expected {expect_last_dim}")
    nbytes = elems * dtype.itemsize
    view = memoryview(body)
    if view.nbytes != nbytes:
        raise WireError(f"tensor body is {view.nbytes} bytes, {meta['dtype']}{shape} needs {nbytes}")
    if view.readonly:
        body = bytearray(view)  # torch.frombuffer warns on (and would alias) read-only memory
    return torch.frombuffer(body, dtype=dtype).view(shape)


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------
def error_frame(code: str, message: str, seq: int | None = None) -> Frame:
    header: dict[str, Any] = {"code": str(code)[:64], "message": str(message)[:1024]}
    if seq is not None:
        header["seq"] = seq
    return Frame(MsgType.ERROR, header)


def raise_if_error(frame: Frame) -> Frame:
    """Turn an ERROR frame into RemoteError(code, message); return any other frame unchanged."""
    if frame.type == MsgType.ERROR:
        code = frame.header.get("code")
        message = frame.header.get("message")
        raise RemoteError(
            code if isinstance(code, str) else "unknown",
            f"peer answered error: {message if isinstance(message, str) else '(no message)'}",
        )
    return frame


# --------------------------------------------------------------------------------------------------
# FramedStream
# --------------------------------------------------------------------------------------------------
class FramedStream:
    """Frames over one libp2p stream. Not safe for concurrent send() or recv() from two tasks."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self._buf = bytearray()  # bytes read past the current frame (never more than one read)

    @property
    def remote_peer_id(self) -> str:
        return str(self.stream.muxed_conn.peer_id)

    async def send(self, frame: Frame, *, timeout_s: float = config.WRITE_TIMEOUT_S) -> None:
        data = encode_frame(frame)
        try:
            with trio.fail_after(timeout_s):
                await self.stream.write(data)
        except trio.TooSlowError:
            raise PeerError(f"peer did not accept a {frame.type.name} frame within {timeout_s:g} s") from None
        except (trio.Cancelled, KeyboardInterrupt):
            raise
        except Exception as e:
            raise PeerError(f"could not send to peer: {type(e).__name__}: {e}") from None

    async def _read_exactly(self, n: int) -> bytearray:
        out = bytearray()
        if self._buf:
            take = min(n, len(self._buf))
            out += self._buf[:take]
            del self._buf[:take]
        while len(out) < n:
            try:
                chunk = await self.stream.read(n - len(out))
            except (trio.Cancelled, KeyboardInterrupt):
                raise
            except Exception as e:  # StreamEOF, StreamReset, StreamError, muxer errors
                chunk = None
                cause = type(e).__name__
            else:
                cause = "EOF"
            if not chunk:
                raise _EOFInside(cause, len(out))
            if len(chunk) > n - len(out):  # defensive: a muxer that returns more than asked
                self._buf += chunk[n - len(out) :]
                chunk = chunk[: n - len(out)]
            out += chunk
        return out

    async def recv(self, *, timeout_s: float = config.READ_TIMEOUT_S) -> Frame:
        """Read one whole frame. EOF before the first byte -> PeerError("... closed the stream")."""
        try:
            with trio.fail_after(timeout_s):
                try:
                    prefix = await self._read_exactly(PREFIX_BYTES)
                except _EOFInside as e:
                    if e.got == 0:
                        raise PeerClosed(f"peer closed the stream ({e.cause}) instead of replying") from None
                    raise
                mtype, header_len, body_len = parse_prefix(prefix)
                header = parse_header(await self._read_exactly(header_len)) if header_len else {}
                body = await self._read_exactly(body_len) if body_len else bytearray()
        except _EOFInside as e:
            raise PeerError(f"peer closed the stream mid-message ({e.cause})") from None
        except trio.TooSlowError:
            raise PeerError(f"peer sent no complete frame within {timeout_s:g} s") from None
        return Frame(mtype, header, body)

    async def request(self, frame: Frame, *, timeout_s: float = config.REQUEST_TIMEOUT_S) -> Frame:
        """Send one frame, read one reply; ERROR replies raise RemoteError."""
        with trio.move_on_after(timeout_s) as scope:
            await self.send(frame, timeout_s=timeout_s)
            reply = await self.recv(timeout_s=timeout_s)
        if scope.cancelled_caught:
            raise PeerError(f"peer did not answer {frame.type.name} within {timeout_s:g} s")
        return raise_if_error(reply)

    async def close(self) -> None:
        """Graceful close, bounded; falls back to reset. Never raises."""
        with trio.move_on_after(config.CLOSE_TIMEOUT_S):
            try:
                await self.stream.close()
                return
            except Exception:
                pass
        await self.reset()  # close failed or timed out

    async def reset(self) -> None:
        """Abort the stream (the peer's reads fail at once). Never raises."""
        with trio.move_on_after(config.CLOSE_TIMEOUT_S):
            try:
                await self.stream.reset()
            except Exception:
                pass


class _EOFInside(Exception):
    def __init__(self, cause: str, got: int) -> None:
        super().__init__(cause)
        self.cause, self.got = cause, got


# --------------------------------------------------------------------------------------------------
# Inference protocol (PROTOCOL_INFERENCE): one long-lived stream per (client session, server).
#
#   client                                        server
#   OPEN {model, start, end, max_length,       ->
#         wire_dtype, upstream}
#                                              <- OPENED {session, max_length, cache_tokens_left} | ERROR
#   LINK {seq, next: {peer_id, addrs, session}} ->     (optional: relay to the next server)
#                                              <- LINKED {seq} | ERROR {seq}
#   STEP {seq, position, relay, tensor} + body ->      (repeated: prefill, then one token per step)
#                                              <- OUTPUT {seq, tensor[, relay_failed]} + body | ERROR {seq}
#   CLOSE                                      ->
#                                              <- CLOSED
#
# Relay: a server that holds a LINK and receives a STEP with relay=true sends its output as a STEP
# (same seq, relay=true) to the next server over a stream that began with ATTACH {session} (accepted
# only from the `upstream` peer the client named in OPEN, and only for that unguessable session id);
# the last server of the run answers OUTPUT to the client on the client's own stream. Every OUTPUT and
# ERROR goes to the client, whichever stream the STEP came in on. A server whose forward fails answers
# OUTPUT with `relay_failed` and its own output, so the client carries on from there.
#
# A stream that ends without CLOSE is a failure on either side; an ERROR reply leaves the session
# open. `position` is where the step's first token goes: below the cache's length it rewinds the
# session there (replays, re-sent turns); above it is an error.
# --------------------------------------------------------------------------------------------------
SESSION_ID_CHARS = 32  # 16 random bytes, hex


@dataclass(frozen=True)
class OpenRequest:
    model: str
    start: int
    end: int
    max_length: int
    wire_dtype: str | None = None  # dtype of the outputs this session wants; None: the input's dtype
    upstream: str | None = None  # peer id allowed to ATTACH (the previous server of the chain)

    def frame(self) -> Frame:
        header: dict[str, Any] = {"model": self.model, "start": self.start, "end": self.end,
                                  "max_length": self.max_length}
        if self.wire_dtype is not None:
            header["wire_dtype"] = self.wire_dtype
        if self.upstream is not None:
            header["upstream"] = self.upstream
        return Frame(MsgType.OPEN, header)

    @classmethod
    def parse(cls, frame: Frame) -> OpenRequest:
        if frame.type != MsgType.OPEN:
            raise WireError(f"expected OPEN, got {frame.type.name}")
        h = frame.header
        model = h.get("model")
        if not isinstance(model, str) or not 0 < len(model) <= config.MAX_RECORD_STRING_CHARS:
            raise WireError("OPEN needs a model name")
        values = [h.get(k) for k in ("start", "end", "max_length")]
        if any(type(v) is not int for v in values):
            raise WireError("OPEN needs integer start, end and max_length")
        wire_dtype = h.get("wire_dtype")
        if wire_dtype is not None and wire_dtype not in DTYPES:
            raise WireError(f"wire_dtype {wire_dtype!r} is not one of {', '.join(DTYPES)}")
        upstream = h.get("upstream")
        if upstream is not None and not (isinstance(upstream, str) and 0 < len(upstream) <= 128):
            raise WireError("OPEN upstream must be a peer id")
        return cls(model, *values, wire_dtype, upstream)


@dataclass(frozen=True)
class NextHop:
    """Where a server forwards relayed outputs: the next server and the session opened there."""

    peer_id: str
    addrs: tuple[str, ...]
    session: str

    def frame(self, seq: int) -> Frame:
        return Frame(MsgType.LINK, {"seq": seq, "next": {"peer_id": self.peer_id, "addrs": list(self.addrs),
                                                         "session": self.session}})

    @classmethod
    def parse(cls, frame: Frame) -> NextHop:
        nxt = frame.header.get("next")
        if not isinstance(nxt, dict):
            raise WireError("LINK needs next: {peer_id, addrs, session}")
        peer_id, addrs, session = nxt.get("peer_id"), nxt.get("addrs"), nxt.get("session")
        if not isinstance(peer_id, str) or not 0 < len(peer_id) <= 128:
            raise WireError("LINK next.peer_id must be a peer id")
        if (not isinstance(addrs, list) or not 0 < len(addrs) <= config.MAX_RECORD_ADDRS
                or not all(isinstance(a, str) and 0 < len(a) <= config.MAX_RECORD_STRING_CHARS for a in addrs)):
            raise WireError(f"LINK next.addrs must be 1..{config.MAX_RECORD_ADDRS} multiaddrs")
        return cls(peer_id, tuple(addrs), parse_session_id(session))


def parse_session_id(value: Any) -> str:
    if not (isinstance(value, str) and len(value) == SESSION_ID_CHARS
            and all(c in "0123456789abcdef" for c in value)):
        raise WireError("session id must be 32 lowercase hex characters")
    return value


def parse_seq(frame: Frame) -> int | None:
    """The step/request number a client tagged a frame with (echoed in replies), or None."""
    seq = frame.header.get("seq")
    if seq is None:
        return None
    if type(seq) is not int or not 0 <= seq < 2**53:
        raise WireError("seq must be a non-negative integer")
    return seq


def step_frame(position: int, hidden: torch.Tensor, seq: int | None = None,
               relay: bool = False) -> tuple[Frame, torch.Tensor]:
    """A STEP frame, and the contiguous tensor its body views (keep it alive until sent)."""
    hidden = hidden.contiguous()
    meta, body = encode_tensor(hidden)
    header: dict[str, Any] = {"position": position, "tensor": meta}
    if seq is not None:
        header["seq"] = seq
    if relay:
        header["relay"] = True
    return Frame(MsgType.STEP, header, body), hidden


def output_frame(hidden: torch.Tensor, seq: int | None = None,
                 relay_failed: str | None = None) -> tuple[Frame, torch.Tensor]:
    hidden = hidden.contiguous()
    meta, body = encode_tensor(hidden)
    header: dict[str, Any] = {"tensor": meta}
    if seq is not None:
        header["seq"] = seq
    if relay_failed is not None:
        header["relay_failed"] = relay_failed[:1024]
    return Frame(MsgType.OUTPUT, header, body), hidden


def parse_step(frame: Frame, hidden_size: int, max_tokens: int) -> tuple[int, torch.Tensor]:
    """(position, hidden [1, T, hidden_size]) from a STEP, every field checked."""
    position = frame.header.get("position")
    if type(position) is not int or position < 0:
        raise WireError("STEP needs a non-negative integer position")
    hidden = decode_tensor(frame.header.get("tensor"), frame.body, expect_last_dim=hidden_size,
                           max_elems=max_tokens * hidden_size)
    if hidden.dim() != 3 or hidden.shape[0] != 1:
        raise WireError(f"STEP tensor must be [1, tokens, {hidden_size}], got {list(hidden.shape)}")
    return position, hidden


def parse_output(frame: Frame, hidden_size: int, tokens: int) -> torch.Tensor:
    frame = raise_if_error(frame)
    if frame.type != MsgType.OUTPUT:
        raise WireError(f"expected OUTPUT, got {frame.type.name}")
    hidden = decode_tensor(frame.header.get("tensor"), frame.body, expect_last_dim=hidden_size,
                           max_elems=tokens * hidden_size)
    if list(hidden.shape) != [1, tokens, hidden_size]:
        raise WireError(f"OUTPUT tensor is {list(hidden.shape)}, expected [1, {tokens}, {hidden_size}]")
    return hidden
