"""Frames over one libp2p stream: whole frames in and out, every wait bounded.

A stream may move, between two frames, to a direct TLS connection (node/dataplane.py: `switch_to`);
the same frames then travel over it, and the libp2p stream stays open and idle until it is closed.

py-libp2p reports a peer killed mid-reply as a clean EOF, so a reader that hits EOF inside a frame
(before `12 + header_len + body_len` bytes) raises PeerError instead of returning a short reply; EOF
between frames is PeerClosed, the normal end of a request loop. A frame's prefix is checked before
its body is read, so an oversized frame is refused without reading (or allocating) it.

Once direct, frames take a lean path (`_recv_direct`, `try_write`): what is already there is read or
written at once, and deadline scopes are set up only when a wait is needed. The deadlines are the
same; a decode step simply finds its whole frame there, or waits once for it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import trio
from llmswarm.node import config
from llmswarm.node.errors import PeerClosed, PeerError, WireError
from llmswarm.node.wire.codec import PREFIX_BYTES, Frame, encode_frame, parse_header, parse_prefix
from llmswarm.node.wire.messages import Error


class FramedStream:
    """Frames over one libp2p stream (or the data-plane connection it moved to). Not safe for
    concurrent send() or recv() from two tasks. `stream` is anything with read(n), write(data),
    close() and reset(): a py-libp2p stream or a data-plane transport (node/wire/socket_transport.py)."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self._buf = bytearray()  # bytes read but not yet returned (at most READ_CHUNK_BYTES past a frame)
        self.libp2p: Any = stream  # the stream libp2p authenticated: whose peer id, and kept open when direct
        self.closed = False
        self._waiting: trio.CancelScope | None = None  # a recv() waiting for a frame's first byte
        self._mid_frame = False

    @property
    def remote_peer_id(self) -> str:
        return str(self.libp2p.muxed_conn.peer_id)

    @property
    def direct(self) -> bool:
        """Frames travel over the data plane (TLS, or the Unix socket on one host), not libp2p."""
        return self.stream is not self.libp2p

    @property
    def path(self) -> str:
        """What frames travel over: "libp2p", "TLS" or "Unix socket"."""
        return getattr(self.stream, "kind", "data plane") if self.direct else "libp2p"

    def switch_to(self, transport: Any, buffered: bytes | bytearray = b"") -> None:
        """From the next frame on, read and write over `transport` (`buffered`: bytes already read from
        it). Only between frames, once, on an open stream; a recv() waiting for a first byte is woken
        to wait on the new transport. WireError if the stream cannot switch now."""
        if self.direct or self.closed or self._mid_frame or self._buf:
            raise WireError("this stream cannot move to the data plane now")
        self.stream, self._buf = transport, bytearray(buffered)
        if self._waiting is not None:
            self._waiting.cancel()

    def input_probe(self) -> Callable[[], bool] | None:
        """A poll that says, without waiting or reading, whether a frame (or a close) has begun to
        arrive; None where the transport cannot say (a libp2p stream: its bytes share a connection)."""
        if not self.direct:
            return None
        transport = self.stream
        return lambda: bool(self._buf) or transport.has_input()

    def take_buffer(self) -> bytearray:
        """Bytes read past the last frame (handed on with the transport by switch_to)."""
        out, self._buf = self._buf, bytearray()
        return out

    async def send(self, frame: Frame, *, timeout_s: float = config.WRITE_TIMEOUT_S) -> None:
        data = encode_frame(frame)
        if self.direct:
            try:
                sent = self.stream.try_write(data)
            except Exception as e:
                raise PeerError(f"could not send to peer: {type(e).__name__}: {e}") from None
            if sent == len(data):
                await self.stream.quick_checkpoint()
                return
            data = memoryview(data)[sent:]  # the rest waits for room, within the deadline below
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
        # Ask the transport for whatever it holds (at least the rest of this piece, up to
        # READ_CHUNK_BYTES more) and keep the excess: one read per frame instead of four. Each yamux
        # read also sends a window update, so fewer reads are fewer frames on the wire.
        while len(self._buf) < n:
            try:
                chunk = await self.stream.read(max(n - len(self._buf), config.READ_CHUNK_BYTES))
            except (trio.Cancelled, KeyboardInterrupt):
                raise
            except Exception as e:  # StreamEOF, StreamReset, StreamError, muxer errors, TLS errors
                chunk = None
                cause = type(e).__name__
            else:
                cause = "EOF"
            if not chunk:
                raise _EOFInside(cause, len(self._buf))
            self._buf += chunk
        out = self._buf[:n]
        del self._buf[:n]
        return out

    async def recv(self, *, timeout_s: float = config.READ_TIMEOUT_S, max_body: int | None = None) -> Frame:
        """Read one whole frame. Its first byte must come within `timeout_s` (math.inf: as long as
        the peer likes to stay idle); once it has begun, the rest within FRAME_TIMEOUT_S plus the
        body at MIN_FRAME_BYTES_PER_S, so a peer cannot hold a half-sent frame (and our buffer) open.
        `max_body` lowers the frame type's body limit: a larger frame is refused before its body is
        read. EOF before the first byte -> PeerClosed."""
        if self.direct:
            return await self._recv_direct(timeout_s, max_body)
        try:
            with trio.fail_after(timeout_s):
                first = await self._first_byte()
            frame_s = config.FRAME_TIMEOUT_S
            self._mid_frame = True
            with trio.fail_after(frame_s) as scope:
                prefix = first + await self._read_exactly(PREFIX_BYTES - 1)
                mtype, header_len, body_len = parse_prefix(prefix)
                if max_body is not None and body_len > max_body:
                    raise WireError(f"{mtype.name} body of {body_len} bytes exceeds this stream's limit of {max_body}")
                frame_s += body_len / config.MIN_FRAME_BYTES_PER_S
                scope.deadline += body_len / config.MIN_FRAME_BYTES_PER_S
                header = parse_header(await self._read_exactly(header_len)) if header_len else {}
                body = await self._read_exactly(body_len) if body_len else bytearray()
        except _EOFInside as e:
            raise PeerError(f"peer closed the stream mid-message ({e.cause})") from None
        except trio.TooSlowError:
            bound = frame_s if self._mid_frame else timeout_s
            raise PeerError(f"peer sent no complete frame within {bound:g} s") from None
        finally:
            self._mid_frame = False
        return Frame(mtype, header, body)

    async def _recv_direct(self, timeout_s: float, max_body: int | None) -> Frame:
        """recv() over the data plane: the same limits and deadlines, no scope unless it must wait."""
        t, buf = self.stream, self._buf
        need, prefix, begun = PREFIX_BYTES, None, None
        while True:
            if prefix is None and len(buf) >= PREFIX_BYTES:
                prefix = parse_prefix(buf[:PREFIX_BYTES])
                if max_body is not None and prefix[2] > max_body:
                    raise WireError(f"{prefix[0].name} body of {prefix[2]} bytes exceeds this stream's limit "
                                    f"of {max_body}")
                need = PREFIX_BYTES + prefix[1] + prefix[2]
            if len(buf) >= need:
                mtype, header_len, _ = prefix
                header = parse_header(buf[PREFIX_BYTES : PREFIX_BYTES + header_len]) if header_len else {}
                body = buf[PREFIX_BYTES + header_len : need]
                del buf[:need]
                await t.quick_checkpoint()
                return Frame(mtype, header, body)
            try:
                chunk = t.read_nowait(max(need - len(buf), config.READ_CHUNK_BYTES))
            except (trio.Cancelled, KeyboardInterrupt):
                raise
            except Exception as e:  # TLS and socket errors end the stream like EOF
                chunk, cause = b"", type(e).__name__
            else:
                cause = "EOF"
            if chunk:
                buf += chunk
                continue
            if chunk is not None:  # EOF or a broken connection
                if not buf:
                    raise PeerClosed("peer closed the stream instead of replying")
                raise PeerError(f"peer closed the stream mid-message ({cause})")
            if not buf:
                limit, what = timeout_s, timeout_s
            else:
                if begun is None:
                    begun = trio.current_time()
                what = config.FRAME_TIMEOUT_S + (prefix[2] / config.MIN_FRAME_BYTES_PER_S if prefix else 0.0)
                limit = begun + what - trio.current_time()
            try:
                if limit == math.inf:
                    await t.wait_readable()
                    continue
                with trio.move_on_after(max(limit, 0.0)) as scope:
                    await t.wait_readable()
            except trio.ClosedResourceError:  # our side closed it (the session ended): as EOF
                if not buf:
                    raise PeerClosed("the stream was closed") from None
                raise PeerError("the stream was closed mid-message") from None
            if scope.cancelled_caught:
                raise PeerError(f"peer sent no complete frame within {what:g} s")

    async def _first_byte(self) -> bytearray:
        while True:
            with trio.CancelScope() as self._waiting:
                try:
                    return await self._read_exactly(1)
                except _EOFInside:
                    raise PeerClosed("peer closed the stream instead of replying") from None
                finally:
                    self._waiting = None
            # switch_to cancelled the wait: wait on the new transport

    async def request(self, frame: Frame, *, timeout_s: float = config.REQUEST_TIMEOUT_S) -> Frame:
        """Send one frame, read one reply; ERROR replies raise RemoteError."""
        with trio.move_on_after(timeout_s) as scope:
            await self.send(frame, timeout_s=timeout_s)
            reply = await self.recv(timeout_s=timeout_s)
        if scope.cancelled_caught:
            raise PeerError(f"peer did not answer {frame.type.name} within {timeout_s:g} s")
        return Error.raise_if(reply)

    async def close(self) -> None:
        """Graceful close (both transports once direct), bounded; falls back to reset. Never raises."""
        self.closed = True
        for stream in {id(s): s for s in (self.stream, self.libp2p)}.values():
            with trio.move_on_after(config.CLOSE_TIMEOUT_S):
                try:
                    await stream.close()
                    continue
                except Exception:
                    pass
            await _reset(stream)  # close failed or timed out

    async def reset(self) -> None:
        """Abort the stream (the peer's reads fail at once). Never raises."""
        self.closed = True
        for stream in {id(s): s for s in (self.stream, self.libp2p)}.values():
            await _reset(stream)


async def _reset(stream: Any) -> None:
    with trio.move_on_after(config.CLOSE_TIMEOUT_S):
        try:
            await stream.reset()
        except Exception:
            pass


class _EOFInside(Exception):
    def __init__(self, cause: str, got: int) -> None:
        super().__init__(cause)
        self.cause, self.got = cause, got
