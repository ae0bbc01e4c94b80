"""The records protocol's messages (`/llmswarm/records/1`), like node/wire/messages.py's:
RecordsGet {model|null} -> Records {lengths} + envelopes; RecordPut + envelope -> Ack {added}.
The envelopes themselves are verified by node/discovery/records.py."""

from __future__ import annotations

from dataclasses import dataclass

from llmswarm.node import config
from llmswarm.node.errors import WireError
from llmswarm.node.wire.codec import Frame, MsgType
from llmswarm.node.wire.messages import Error, _expect


@dataclass(frozen=True)
class RecordsGet:
    model: str | None  # None: every model's records

    def to_frame(self) -> Frame:
        return Frame(MsgType.RECORDS_GET, {"model": self.model})

    @classmethod
    def from_frame(cls, frame: Frame) -> RecordsGet:
        model = _expect(frame, MsgType.RECORDS_GET).get("model")
        if model is not None and not (isinstance(model, str) and len(model) <= config.MAX_RECORD_STRING_CHARS):
            raise WireError("RECORDS_GET model must be a model name or null")
        return cls(model)


@dataclass(frozen=True)
class Records:
    envelopes: list[bytes]

    def to_frame(self) -> Frame:
        return Frame(MsgType.RECORDS, {"lengths": [len(e) for e in self.envelopes]}, b"".join(self.envelopes))

    @classmethod
    def from_frame(cls, frame: Frame) -> Records:
        lengths = _expect(Error.raise_if(frame), MsgType.RECORDS).get("lengths")
        if not isinstance(lengths, list) or not all(
            type(n) is int and 0 < n <= config.MAX_RECORD_BYTES for n in lengths
        ):
            raise WireError("RECORDS frame needs a list of record lengths")
        if sum(lengths) != len(frame.body):
            raise WireError("RECORDS frame lengths do not add up to its body")
        out, pos = [], 0
        for n in lengths:
            out.append(bytes(frame.body[pos : pos + n]))
            pos += n
        return cls(out)


@dataclass(frozen=True)
class RecordPut:
    envelope: bytes

    def to_frame(self) -> Frame:
        return Frame(MsgType.RECORD_PUT, {}, self.envelope)

    @classmethod
    def from_frame(cls, frame: Frame) -> RecordPut:
        _expect(frame, MsgType.RECORD_PUT)
        return cls(bytes(frame.body))


@dataclass(frozen=True)
class Ack:
    added: bool

    def to_frame(self) -> Frame:
        return Frame(MsgType.ACK, {"added": self.added})

    @classmethod
    def from_frame(cls, frame: Frame) -> Ack:
        return cls(_expect(Error.raise_if(frame), MsgType.ACK).get("added") is True)
