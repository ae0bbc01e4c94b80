"""The wire codec, sans-IO: frames and tensors to and from bytes, with every size limit checked.

Nothing here touches a socket (node/wire/stream.py moves frames over a libp2p stream; the messages
that ride in frames are typed in node/wire/messages.py).

Frame = 12-byte fixed prefix, then a JSON header, then a raw body:

    magic b"LS" | version u8 | type u8 | header_len u32 BE | body_len u32 BE | header | body

The lengths make a truncated message detectable: py-libp2p reports a peer killed mid-reply as a
clean EOF, so a reader that hits EOF before `12 + header_len + body_len` bytes raises
PeerError instead of returning a short reply. The prefix is validated before anything else is
read, so an oversized frame is refused without reading (or allocating) its body.

Tensors travel as raw little-endian bytes of a contiguous CPU tensor plus {"dtype", "shape"} in the
header; never pickle (a peer could run code on us). torch is imported with the first tensor: the
processes that never carry one (bootstrap, probe, status, route) start 1.4 s sooner without it.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING, Any

from llmswarm.node import config
from llmswarm.node.errors import WireError

if TYPE_CHECKING:
    import torch

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
    DIRECT = 18  # first frame on a data-plane TLS connection: carry the stream this token was offered on
    DIRECTED = 19


_TYPE_OF = {int(t): t for t in MsgType}  # a dict lookup: MsgType(n) costs twice as much on a decode step

# Only frames that carry tensors or records have a body; a control frame with one is refused before
# its body is read, so no frame type can make a peer buffer more than its own kind needs.
_BODY_LIMITS = {
    MsgType.STEP: config.MAX_FRAME_BODY_BYTES,
    MsgType.OUTPUT: config.MAX_FRAME_BODY_BYTES,
    MsgType.RECORDS: config.MAX_RECORDS_BODY_BYTES,
    MsgType.RECORD_PUT: config.MAX_RECORD_BYTES,
}


def body_limit(mtype: MsgType) -> int:
    return _BODY_LIMITS.get(mtype, 0)


# Made once: json.dumps with non-default options builds a new encoder per call. Every step's frames
# are encoded and parsed right after the span's compute has flushed the CPU's caches, where each
# object Python touches costs a trip to memory (node/wire/stream.py has the figures).
_HEADER_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)
_HEADER_DECODER = json.JSONDecoder()


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
    header = _per_token_header(frame.type, frame.header) if frame.header else b""
    if header is None:
        header = _HEADER_ENCODER.encode(frame.header).encode()
    if len(header) > config.MAX_HEADER_BYTES:
        raise WireError(f"frame header is {len(header)} bytes, above the {config.MAX_HEADER_BYTES} limit")
    body_len = memoryview(frame.body).nbytes
    if body_len > body_limit(frame.type):
        raise WireError(f"{frame.type.name} body is {body_len} bytes, above its limit of {body_limit(frame.type)}")
    prefix = PREFIX.pack(MAGIC, config.WIRE_VERSION, int(frame.type), len(header), body_len)
    return b"".join((prefix, header, frame.body))


# STEP's and OUTPUT's usual headers (the keys Step and Output put in them, in their order), byte for
# byte as _HEADER_ENCODER writes them: a test holds them to it. These two frames cross every hop of every
# token, right after a span's compute has flushed the caches: json's encoder costs ~30 us there, a
# template ~6.
_STEP_HEADER = b'{"seq":%d,"position":%d,"tensor":{"dtype":"%s","shape":[%d,%d,%d]}'
_OUTPUT_HEADER = b'{"seq":%d,"tensor":{"dtype":"%s","shape":[%d,%d,%d]}}'


def _per_token_header(mtype: MsgType, h: dict[str, Any]) -> bytes | None:
    """The header of a STEP or OUTPUT as Step/Output write it, from a template; None for any other
    header (json writes those)."""
    if mtype is not MsgType.STEP and mtype is not MsgType.OUTPUT:
        return None
    seq, tensor = h.get("seq"), h.get("tensor")
    if type(seq) is not int or type(tensor) is not dict or len(tensor) != 2:
        return None
    dtype, shape = tensor.get("dtype"), tensor.get("shape")
    if dtype not in WIRE_DTYPES or type(shape) is not list or len(shape) != 3 or \
            type(shape[0]) is not int or type(shape[1]) is not int or type(shape[2]) is not int:
        return None
    if mtype is MsgType.OUTPUT:
        return _OUTPUT_HEADER % (seq, dtype.encode(), *shape) if len(h) == 2 else None
    position, relay = h.get("position"), h.get("relay")
    if type(position) is not int or len(h) != (3 if relay is None else 4) or (relay is not None and relay is not True):
        return None
    return _STEP_HEADER % (seq, position, dtype.encode(), *shape) + (b"}" if relay is None else b',"relay":true}')


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
    mtype = _TYPE_OF.get(mtype, mtype)
    if type(mtype) is not MsgType:
        raise WireError(f"unknown message type {mtype}")
    if header_len > config.MAX_HEADER_BYTES:
        raise WireError(f"frame header of {header_len} bytes exceeds the {config.MAX_HEADER_BYTES} limit")
    if body_len > _BODY_LIMITS.get(mtype, 0):
        raise WireError(f"{mtype.name} body of {body_len} bytes exceeds its limit of {body_limit(mtype)}")
    return mtype, header_len, body_len


def parse_header(raw: bytes | bytearray) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        text = str(raw, "utf-8")
        try:  # the compact JSON every node sends; anything else (spaces around it, garbage) the long way
            header, end = _HEADER_DECODER.raw_decode(text)
        except json.JSONDecodeError:
            end = -1
        if end != len(text):
            header = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WireError(f"frame header is not UTF-8 JSON: {e}") from None
    except RecursionError:  # a deeply nested header is the sender's fault, not ours
        raise WireError("frame header nests too deeply") from None
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
WIRE_DTYPES = ("float32", "bfloat16", "float16")  # what a tensor may travel as
_torch: Any = None  # the torch module, once the first tensor has come by
_torch_dtypes: dict[str, torch.dtype] = {}
_dtype_names: dict[torch.dtype, str] = {}
# name -> (numpy dtype of the same width, torch dtype to view it as or None): a received tensor is a
# numpy array over the body, handed to torch (numpy has no bfloat16: its bytes go as int16, then a view)
_numpy_views: dict[str, tuple[Any, Any]] = {}
_np_array: Any = None  # numpy.ndarray, with torch
_numpy_names: dict[Any, str] = {}  # numpy dtype -> wire name, where numpy has the dtype (derived from the above)


def _dtypes() -> dict[str, torch.dtype]:
    """The wire's dtypes by name; imports torch the first time (once per process, not per step)."""
    global _torch, _np_array
    if _torch is None:
        import numpy
        import torch

        _torch_dtypes.update({name: getattr(torch, name) for name in WIRE_DTYPES})
        _dtype_names.update({v: k for k, v in _torch_dtypes.items()})
        _numpy_views.update({"float32": (numpy.dtype(numpy.float32), None),
                             "float16": (numpy.dtype(numpy.float16), None),
                             "bfloat16": (numpy.dtype(numpy.int16), torch.bfloat16)})
        _numpy_names.update({np_dtype: name for name, (np_dtype, view) in _numpy_views.items() if view is None})
        _np_array, _torch = numpy.ndarray, torch
    return _torch_dtypes


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a wire dtype name (KeyError for a name not in WIRE_DTYPES)."""
    return _dtypes()[name]


def dtype_name(dtype: torch.dtype) -> str:
    """The wire's name of a dtype it can carry (WireError for any other)."""
    _dtypes()
    name = _dtype_names.get(dtype)
    if name is None:
        raise WireError(f"dtype {dtype} cannot be sent; allowed: {', '.join(WIRE_DTYPES)}")
    return name


def encode_tensor(t: torch.Tensor) -> tuple[dict[str, Any], memoryview]:
    """(meta, body): body is a zero-copy view of the tensor's bytes (keep `t` alive until sent)."""
    try:  # a decode step's tensor (contiguous, on the CPU, float32 or float16, no grad): one torch call
        arr = t.numpy()
        body = memoryview(arr).cast("B")
    except (TypeError, RuntimeError):  # bfloat16, grad, another device, not contiguous: the general path
        return _encode_tensor(t)
    name = _numpy_names.get(arr.dtype)
    if name is None or arr.ndim == 0:
        return _encode_tensor(t)  # which says what is wrong
    return {"dtype": name, "shape": list(arr.shape)}, body


def _encode_tensor(t: torch.Tensor) -> tuple[dict[str, Any], memoryview]:
    name = dtype_name(t.dtype)
    if t.dim() == 0:
        raise WireError("0-dim tensors cannot be sent; reshape to [1]")
    if t.requires_grad or not t.is_cpu:
        t = t.detach().cpu()
    if not t.is_contiguous():
        t = t.contiguous()
    if name == "bfloat16":  # no numpy dtype: view the storage as bytes instead
        body = memoryview(t.reshape(-1).view(_torch.uint8).numpy())
    else:  # one torch call where the general path takes four (each a cold dispatch on a decode step)
        body = memoryview(t.numpy()).cast("B")
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
    name = meta.get("dtype")
    dtype = _dtypes().get(name) if isinstance(name, str) else None
    if dtype is None:
        raise WireError(f"tensor dtype {name!r} is not allowed; allowed: {', '.join(WIRE_DTYPES)}")
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
        body = bytearray(view)  # torch warns on (and would alias) read-only memory
    # numpy's array over the buffer, then torch.from_numpy: half the cold-cache cost of
    # torch.frombuffer(...).view(shape), and this runs once per frame on the decode path
    np_dtype, as_torch = _numpy_views[name]
    tensor = _torch.from_numpy(_np_array(shape, np_dtype, body))
    return tensor if as_torch is None else tensor.view(as_torch)
