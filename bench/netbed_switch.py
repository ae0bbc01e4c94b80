"""The WAN bed's switch (bench/netbed.py), run inside the hub namespace: one TAP device per node
namespace, every frame a node sends delayed and dropped on its way out by that node's link setting.
Plain Python and select(): a few thousand frames a second is all a test swarm sends."""

from __future__ import annotations

import contextlib
import fcntl
import heapq
import os
import random
import select
import struct
import sys
import time

MAX_FRAME_BYTES = 65536
_TUNSETIFF = 0x400454CA
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000


def _open_tap(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", name.encode(), _IFF_TAP | _IFF_NO_PI))
    return fd


def run_switch(tag: str, spec: str) -> None:
    """Forward frames among TAPs with a per-port egress delay and loss. Prints the TAP names on
    one line, then serves; stdin lines `PORT DELAY_MS LOSS` change a port (answered `ok`); EOF on
    stdin (the bed is gone) ends it, and the TAPs vanish with their files."""
    links = [(float(d) / 1000.0, float(p)) for d, p in (x.split(":") for x in spec.split(","))]
    names = [f"{tag[-8:]}t{i}" for i in range(len(links))]
    fds = [_open_tap(n) for n in names]
    port_of_fd = {fd: i for i, fd in enumerate(fds)}
    mac_port: dict[bytes, int] = {}
    queue: list[tuple[float, int, int, bytes]] = []  # (due, seq, from port, frame)
    seq = 0
    rng = random.Random(0)
    print(" ".join(names), flush=True)
    ctl = sys.stdin.fileno()
    ctl_buf = b""
    while True:
        now = time.monotonic()
        timeout = max(0.0, queue[0][0] - now) if queue else 1.0
        ready, _, _ = select.select([*fds, ctl], [], [], timeout)
        for fd in ready:
            if fd == ctl:
                data = os.read(ctl, 4096)
                if not data:
                    return
                ctl_buf += data
                while b"\n" in ctl_buf:
                    line, ctl_buf = ctl_buf.split(b"\n", 1)
                    port, delay_ms, loss = line.split()
                    links[int(port)] = (float(delay_ms) / 1000.0, float(loss))
                    print("ok", flush=True)
                continue
            port = port_of_fd[fd]
            delay, loss = links[port]
            arrived = time.monotonic()
            while True:
                try:
                    frame = os.read(fd, MAX_FRAME_BYTES)
                except BlockingIOError:
                    break
                if len(frame) < 14:
                    continue
                mac_port[frame[6:12]] = port
                if loss and rng.random() < loss:
                    continue
                seq += 1
                heapq.heappush(queue, (arrived + delay, seq, port, frame))
        now = time.monotonic()
        while queue and queue[0][0] <= now:
            _, _, src, frame = heapq.heappop(queue)
            dst = mac_port.get(frame[0:6]) if not frame[0] & 1 else None
            for p in ([dst] if dst is not None else range(len(fds))):
                if p != src:
                    with contextlib.suppress(OSError):  # a full TAP queue drops, as a wire would
                        os.write(fds[p], frame)


if __name__ == "__main__":
    run_switch(sys.argv[1], sys.argv[2])
