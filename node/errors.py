"""Errors raised by hosts, the wire protocol, servers and client sessions."""


class NodeError(Exception):
    """Base of every error of llmswarm.node that a user can act on."""


class WireError(NodeError):
    """A frame that is malformed, oversized, of an unknown version or type, or fails validation."""


class PeerError(NodeError):
    """A peer that cannot be reached, hung up mid-reply, timed out, or answered with an error."""


class RemoteError(PeerError):
    """The remote side answered with an error frame: `code` says which kind."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class PeerClosed(PeerError):
    """The peer ended the stream cleanly between frames (a normal end of a request loop)."""
