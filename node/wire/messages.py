"""The messages of llmswarm's protocols, one typed class each: `to_frame()` builds the frame,
`from_frame()` validates every field of a received one (a WireError names what is wrong). Code
outside node/wire/ reads messages, never raw headers.

Inference (`/llmswarm/inference/2`): one long-lived stream per (client session, server).

    client                                             server
    Open {model, start, end, max_length,          ->
          wire_dtype?, upstream?, direct?}
                                                  <-   Opened {session, max_length, cache_tokens_left,
                                                                direct?} | Error   (direct: node/wire/direct.py)
    Link {seq, next: {peer_id, addrs, session}}   ->   (optional: relay to the next server)
                                                  <-   Linked {seq} | Error {seq}
    Step {seq, position, relay?} + tensor         ->   (repeated: prefill, then one token per step)
                                                  <-   Output {seq, relay_failed?} + tensor | Error {seq}
    Close                                         ->
                                                  <-   Closed

Relay: a server that holds a Link and receives a Step with relay=true sends its output as a Step
(same seq, relay=true) to the next server, over a stream that began with Attach {session} ->
Attached (accepted only from the `upstream` peer the client named in Open, and only for that
unguessable session id). The last server of the run answers Output to the client on the client's
own stream. Every Output and Error goes to the client, whichever stream the Step came in on. A
server whose forward fails answers Output with `relay_failed` and its own output, so the client
carries on from there.

A stream that ends without Close is a failure on either side; an Error reply leaves the session open.
`position` is where the step's first token goes: below the cache's length it rewinds there; above, error.

Records (`/llmswarm/records/1`): node/wire/records.py. Ping (`/llmswarm/ping/1`): Ping {n} -> Pong {n}.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llmswarm.node import config
from llmswarm.node.errors import ErrorCode, RemoteError, WireError
from llmswarm.node.wire.codec import WIRE_DTYPES, Frame, MsgType, decode_tensor, encode_tensor
from llmswarm.node.wire.direct import DirectOffer

if TYPE_CHECKING:
    import torch

SESSION_ID_CHARS, MAX_PEER_ID_CHARS = 32, 128  # a session id is 16 random bytes, hex
MAX_ERROR_MESSAGE_CHARS = 1024


def _expect(frame: Frame, mtype: MsgType) -> dict[str, Any]:
    if frame.type != mtype:
        raise WireError(f"expected {mtype.name}, got {frame.type.name}")
    return frame.header


def parse_session_id(value: Any) -> str:
    if not (isinstance(value, str) and len(value) == SESSION_ID_CHARS
            and all(c in "0123456789abcdef" for c in value)):
        raise WireError("session id must be 32 lowercase hex characters")
    return value


def parse_seq(header: dict[str, Any]) -> int:
    """The request number a client tags a frame with (echoed in replies); 0 when absent."""
    seq = header.get("seq", 0)
    if type(seq) is not int or not 0 <= seq < 2**53:
        raise WireError("seq must be a non-negative integer")
    return seq


def seq_or_none(frame: Frame) -> int | None:
    """The seq to echo when refusing a frame that may itself be malformed."""
    seq = frame.header.get("seq")
    return seq if type(seq) is int and 0 <= seq < 2**53 else None


def _int(header: dict[str, Any], key: str, what: str) -> int:
    value = header.get(key)
    if type(value) is not int:
        raise WireError(f"{what} needs an integer {key}")
    return value


def _peer_id(value: Any, what: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_PEER_ID_CHARS:
        raise WireError(f"{what} must be a peer id")
    return value


@dataclass(frozen=True)
class Open:
    model: str
    start: int
    end: int
    max_length: int
    wire_dtype: str | None = None  # dtype of the outputs this session wants; None: the input's dtype
    upstream: str | None = None  # peer id allowed to ATTACH (the previous server of the chain)
    direct: bool = True  # False: keep this session (and relay links into it) on libp2p, no data plane

    def to_frame(self) -> Frame:
        header: dict[str, Any] = {"model": self.model, "start": self.start, "end": self.end,
                                  "max_length": self.max_length}
        for key, value in (("wire_dtype", self.wire_dtype), ("upstream", self.upstream)):
            if value is not None:
                header[key] = value
        return Frame(MsgType.OPEN, header | ({} if self.direct else {"direct": False}))

    @classmethod
    def from_frame(cls, frame: Frame) -> Open:
        h = _expect(frame, MsgType.OPEN)
        model = h.get("model")
        if not isinstance(model, str) or not 0 < len(model) <= config.MAX_RECORD_STRING_CHARS:
            raise WireError("OPEN needs a model name")
        values = [h.get(k) for k in ("start", "end", "max_length")]
        if any(type(v) is not int for v in values):
            raise WireError("OPEN needs integer start, end and max_length")
        wire_dtype, upstream, direct = h.get("wire_dtype"), h.get("upstream"), h.get("direct", True)
        if wire_dtype is not None and wire_dtype not in WIRE_DTYPES:
            raise WireError(f"wire_dtype {wire_dtype!r} is not one of {', '.join(WIRE_DTYPES)}")
        if upstream is not None:
            _peer_id(upstream, "OPEN upstream")
        if type(direct) is not bool:
            raise WireError("OPEN direct must be true or false")
        return cls(model, *values, wire_dtype, upstream, direct)


@dataclass(frozen=True)
class Opened:
    session: str
    max_length: int
    cache_tokens_left: int
    direct: DirectOffer | None = None  # this stream may move to the server's data plane

    def to_frame(self) -> Frame:
        header = {"session": self.session, "max_length": self.max_length, "cache_tokens_left": self.cache_tokens_left}
        return Frame(MsgType.OPENED, header | ({"direct": self.direct.to_header()} if self.direct else {}))

    @classmethod
    def from_frame(cls, frame: Frame) -> Opened:
        h = _expect(Error.raise_if(frame), MsgType.OPENED)
        return cls(parse_session_id(h.get("session")), _int(h, "max_length", "OPENED"),
                   _int(h, "cache_tokens_left", "OPENED"), DirectOffer.parse(h.get("direct")))


@dataclass(frozen=True)
class NextHop:
    """Where a server forwards relayed outputs: the next server and the session opened there."""

    peer_id: str
    addrs: tuple[str, ...]
    session: str

    @classmethod
    def parse(cls, value: Any) -> NextHop:
        if not isinstance(value, dict):
            raise WireError("LINK needs next: {peer_id, addrs, session}")
        addrs = value.get("addrs")
        if (not isinstance(addrs, list) or not 0 < len(addrs) <= config.MAX_RECORD_ADDRS
                or not all(isinstance(a, str) and 0 < len(a) <= config.MAX_RECORD_STRING_CHARS for a in addrs)):
            raise WireError(f"LINK next.addrs must be 1..{config.MAX_RECORD_ADDRS} multiaddrs")
        return cls(_peer_id(value.get("peer_id"), "LINK next.peer_id"), tuple(addrs),
                   parse_session_id(value.get("session")))


@dataclass(frozen=True)
class Link:
    seq: int
    next: NextHop

    def to_frame(self) -> Frame:
        n = self.next
        return Frame(MsgType.LINK, {"seq": self.seq, "next": {"peer_id": n.peer_id, "addrs": list(n.addrs),
                                                              "session": n.session}})

    @classmethod
    def from_frame(cls, frame: Frame) -> Link:
        h = _expect(frame, MsgType.LINK)
        return cls(parse_seq(h), NextHop.parse(h.get("next")))


@dataclass(frozen=True)
class Linked:
    seq: int

    def to_frame(self) -> Frame:
        return Frame(MsgType.LINKED, {"seq": self.seq})

    @classmethod
    def from_frame(cls, frame: Frame) -> Linked:
        return cls(parse_seq(_expect(frame, MsgType.LINKED)))


@dataclass(frozen=True)
class Attach:
    session: str

    def to_frame(self) -> Frame:
        return Frame(MsgType.ATTACH, {"session": self.session})

    @classmethod
    def from_frame(cls, frame: Frame) -> Attach:
        return cls(parse_session_id(_expect(frame, MsgType.ATTACH).get("session")))


@dataclass(frozen=True)
class Attached:
    direct: DirectOffer | None = None

    def to_frame(self) -> Frame:
        return Frame(MsgType.ATTACHED, {"direct": self.direct.to_header()} if self.direct else {})

    @classmethod
    def from_frame(cls, frame: Frame) -> Attached:
        return cls(DirectOffer.parse(_expect(Error.raise_if(frame), MsgType.ATTACHED).get("direct")))


@dataclass(frozen=True)
class Step:
    """Hidden states [1, T, hidden] entering a span at `position`."""

    seq: int
    position: int
    hidden: torch.Tensor
    relay: bool = False

    def to_frame(self) -> Frame:
        # The body is a zero-copy view of the tensor's bytes (the view keeps the tensor alive).
        meta, body = encode_tensor(self.hidden)
        header: dict[str, Any] = {"seq": self.seq, "position": self.position, "tensor": meta}
        if self.relay:
            header["relay"] = True
        return Frame(MsgType.STEP, header, body)

    @classmethod
    def from_frame(cls, frame: Frame, hidden_size: int, max_tokens: int) -> Step:
        h = _expect(frame, MsgType.STEP)
        seq = parse_seq(h)
        position = h.get("position")
        if type(position) is not int or not 0 <= position < config.MAX_SESSION_LENGTH:
            raise WireError(f"STEP position must be an integer in 0..{config.MAX_SESSION_LENGTH - 1}")
        meta = h.get("tensor")
        hidden = decode_tensor(meta, frame.body, expect_last_dim=hidden_size, max_elems=max_tokens * hidden_size)
        shape = meta["shape"]  # decode_tensor has checked it: a list of positive ints (cheaper than asking torch)
        if len(shape) != 3 or shape[0] != 1:
            raise WireError(f"STEP tensor must be [1, tokens, {hidden_size}], got {shape}")
        return cls(seq, position, hidden, h.get("relay") is True)


@dataclass(frozen=True)
class Output:
    """A span's output for step `seq`; `relay_failed` says why it comes back instead of going on."""

    seq: int
    hidden: torch.Tensor
    relay_failed: str | None = None

    def to_frame(self) -> Frame:
        meta, body = encode_tensor(self.hidden)
        header: dict[str, Any] = {"seq": self.seq, "tensor": meta}
        if self.relay_failed is not None:
            header["relay_failed"] = self.relay_failed[:MAX_ERROR_MESSAGE_CHARS]
        return Frame(MsgType.OUTPUT, header, body)

    @classmethod
    def from_frame(cls, frame: Frame, hidden_size: int, tokens: int) -> Output:
        h = _expect(Error.raise_if(frame), MsgType.OUTPUT)
        meta = h.get("tensor")
        hidden = decode_tensor(meta, frame.body, expect_last_dim=hidden_size, max_elems=tokens * hidden_size)
        if meta["shape"] != [1, tokens, hidden_size]:  # checked by decode_tensor: a list of positive ints
            raise WireError(f"OUTPUT tensor is {meta['shape']}, expected [1, {tokens}, {hidden_size}]")
        failed = h.get("relay_failed")
        return cls(parse_seq(h), hidden, str(failed)[:MAX_ERROR_MESSAGE_CHARS] if failed is not None else None)


@dataclass(frozen=True)
class Close:
    def to_frame(self) -> Frame:
        return Frame(MsgType.CLOSE)


@dataclass(frozen=True)
class Closed:
    def to_frame(self) -> Frame:
        return Frame(MsgType.CLOSED)


@dataclass(frozen=True)
class Error:
    code: ErrorCode
    message: str
    seq: int | None = None

    def to_frame(self) -> Frame:
        header: dict[str, Any] = {"code": self.code.value, "message": self.message[:MAX_ERROR_MESSAGE_CHARS]}
        if self.seq is not None:
            header["seq"] = self.seq
        return Frame(MsgType.ERROR, header)

    @classmethod
    def from_frame(cls, frame: Frame) -> Error:
        h = _expect(frame, MsgType.ERROR)
        message = h.get("message")
        seq = h.get("seq")
        return cls(ErrorCode.parse(h.get("code")),
                   message[:MAX_ERROR_MESSAGE_CHARS] if isinstance(message, str) else "(no message)",
                   seq if type(seq) is int else None)

    @classmethod
    def of(cls, e: BaseException, seq: int | None = None) -> Error:
        """The ERROR that answers an exception raised while handling a request."""
        if isinstance(e, RemoteError):
            return cls(e.code, str(e), seq)
        if isinstance(e, WireError):
            return cls(ErrorCode.BAD_REQUEST, str(e), seq)
        return cls(ErrorCode.INTERNAL, f"server error: {type(e).__name__}", seq)

    def exception(self) -> RemoteError:
        return RemoteError(self.code, f"peer answered {self.code.value}: {self.message}")

    @staticmethod
    def raise_if(frame: Frame) -> Frame:
        """Raise an ERROR frame as RemoteError; return any other frame unchanged."""
        if frame.type == MsgType.ERROR:
            raise Error.from_frame(frame).exception()
        return frame


@dataclass(frozen=True)
class Ping:
    n: int

    def to_frame(self) -> Frame:
        return Frame(MsgType.PING, {"n": self.n})

    @classmethod
    def from_frame(cls, frame: Frame) -> Ping:
        return cls(_int(_expect(frame, MsgType.PING), "n", "PING"))


@dataclass(frozen=True)
class Pong:
    n: int

    def to_frame(self) -> Frame:
        return Frame(MsgType.PONG, {"n": self.n})

    @classmethod
    def from_frame(cls, frame: Frame) -> Pong:
        return cls(_int(_expect(Error.raise_if(frame), MsgType.PONG), "n", "PONG"))
