"""Errors raised by hosts, the wire protocol, servers and client sessions, and the codes of ERROR frames."""

from __future__ import annotations

from enum import Enum


class ErrorCode(str, Enum):
    """What an ERROR frame says went wrong. Transient codes mean "not now": the same request may
    succeed later or on another server, so a client tries elsewhere without holding it against
    the server; every other code is the request's fault or a lasting refusal."""

    BAD_REQUEST = "bad_request"  # malformed or invalid frame: the sender's bug
    WRONG_MODEL = "wrong_model"  # this server serves another model
    WRONG_SPAN = "wrong_span"  # the blocks asked for are not all here
    TOO_LONG = "too_long"  # a session or step longer than this server allows
    UNKNOWN_SESSION = "unknown_session"  # ATTACH to a session that does not exist for this peer
    NO_RELAY = "no_relay"  # this server does not relay
    BAD_RECORD = "bad_record"  # a record that fails verification
    BUSY = "busy"  # at the session limit: try another server or later
    CACHE_FULL = "cache_full"  # no cache room now: try another server or later
    LINK_FAILED = "link_failed"  # could not reach the next server for relay
    INTERNAL = "internal"  # the server failed (a bug or a broken model): not the request's fault
    UNKNOWN = "unknown"  # a code this version does not know (a newer peer)

    @property
    def transient(self) -> bool:
        return self in _TRANSIENT

    @classmethod
    def parse(cls, value: object) -> ErrorCode:
        try:
            return cls(value)
        except ValueError:
            return cls.UNKNOWN


_TRANSIENT = frozenset({ErrorCode.BUSY, ErrorCode.CACHE_FULL, ErrorCode.LINK_FAILED, ErrorCode.INTERNAL})


class NodeError(Exception):
    """Base of every error of llmswarm.node that a user can act on."""


class UsageError(NodeError):
    """Options that cannot work together or with this model (exit code 2, like a bad flag)."""


class NoPeersError(NodeError):
    """No bootstrap address given: raised by the CLI before it loads anything (a 3 s wait otherwise)."""

    def __init__(self) -> None:
        super().__init__("no peers to join: pass --peers MULTIADDR (printed by `llmswarm bootstrap`) "
                         "or set LLMSWARM_PEERS")


class DuplicatePeerError(NodeError):
    """Another live process uses this process's peer id (one key file in two places)."""


class WireError(NodeError):
    """A frame that is malformed, oversized, of an unknown version or type, or fails validation."""


class PeerError(NodeError):
    """A peer that cannot be reached, hung up mid-reply, timed out, or answered with an error."""


class RemoteError(PeerError):
    """The remote side answered with an error frame (or a handler refuses with one): `code` says which kind."""

    def __init__(self, code: ErrorCode | str, message: str) -> None:
        super().__init__(message)
        self.code = ErrorCode.parse(code)


class PeerClosed(PeerError):
    """The peer ended the stream cleanly between frames (a normal end of a request loop)."""
