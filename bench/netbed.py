"""A WAN test bed on one Linux machine: network namespaces joined by a userspace switch that delays
and drops frames, one of them behind a NAT router. Needs root and `ip netns`; no `sch_netem`.

Layout (names carry this process's pid and a count, so beds never meet and stale ones can be found):
  - a hub namespace runs the switch (`python -m llmswarm.bench.netbed_switch`, bench/netbed_switch.py): it opens one TAP
    device per node and moves each into its node's namespace (the TAP's file stays with the switch,
    so every frame a node sends reaches the switch). A frame read from node i is dropped with
    probability loss[i], else held delay[i] ms and written to the node owning the destination MAC
    (learnt from source MACs; broadcast and unknown go to every other node). So each namespace
    delays what it sends: the RTT between i and j is delay[i] + delay[j]. Delay and loss can be
    changed while running (`NetBed.set_link`).
  - node i is 10.77.0.(10+i)/24 on its TAP, with loopback up.
  - a NAT'd node sits in its own namespace at 192.168.77.2 behind a router namespace (on the
    switch as a node, with a veth to the private side) that masquerades with iptables (nf_tables);
    nobody outside can open a connection to it, and its outgoing ones appear from the router.
Everything is torn down on exit, on an exception, on Ctrl-C and on SIGTERM: processes started in
the bed (their whole process groups), the switch (its TAPs vanish with it), the namespaces.

    python -m llmswarm.bench.netbed check        # build a bed, ping across it, report RTTs and NAT
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from llmswarm.node.dataplane import pid_alive
from llmswarm.node.errors import NodeError

SUBNET = "10.77.0"  # the switch's /24
PRIVATE_SUBNET = "192.168.77"  # behind the NAT router
PREFIX = "lsw"  # namespace names: lsw<pid>-<node>
SWITCH_START_TIMEOUT_S = 10.0
STOP_GRACE_S = 5.0


def available() -> str | None:
    """None when a bed can be built here, else why not (for a test's skip reason)."""
    if sys.platform != "linux":
        return "the WAN bed needs Linux network namespaces"
    if os.geteuid() != 0:
        return "the WAN bed needs root (ip netns, TAP devices)"
    if shutil.which("ip") is None:
        return "the WAN bed needs iproute2 (`ip`)"
    if not os.path.exists("/dev/net/tun"):
        return "the WAN bed needs /dev/net/tun"
    probe = f"{PREFIX}probe{os.getpid()}"
    res = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if res.returncode != 0:
        return f"`ip netns add` fails here: {res.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = ["ip", *(["-n", ns] if ns else []), *args]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if check and res.returncode != 0:
        raise NodeError(f"`{' '.join(cmd)}` failed: {res.stderr.strip()}")
    return res


def _in_ns(ns: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True)
    if check and res.returncode != 0:
        raise NodeError(f"`{' '.join(cmd)}` in {ns} failed: {res.stderr.strip()}")
    return res


def remove_stale_beds() -> list[str]:
    """Delete namespaces of beds whose process is gone (a bed killed with SIGKILL)."""
    removed = []
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        m = re.match(rf"({PREFIX}(\d+)b\d+-\S+)", line)
        if m and not pid_alive(int(m.group(2))):
            _ip("netns", "del", m.group(1), check=False)
            removed.append(m.group(1))
    return removed


@dataclass
class Node:
    name: str
    ns: str
    ip: str  # the address others reach it at (a NAT'd node's is the private one: not reachable)
    port: int | None  # its switch port (None: behind the NAT router)
    delay_ms: float
    loss: float


@dataclass
class NetBed:
    """`NetBed({"boot": 25, "s0": 25, ...}, loss={...}, nat=["home"])` as a context manager.
    Delays are one-way ms added to what each node sends; a NAT'd node's traffic takes its router's."""

    delays_ms: dict[str, float]
    loss: dict[str, float] = field(default_factory=dict)
    nat: list[str] = field(default_factory=list)
    nat_delay_ms: float = 0.0
    nodes: dict[str, Node] = field(default_factory=dict, init=False)
    _tag: str = field(default="", init=False)
    _switch: subprocess.Popen | None = field(default=None, init=False)
    _procs: list[subprocess.Popen] = field(default_factory=list, init=False)
    _namespaces: list[str] = field(default_factory=list, init=False)
    _old_sigterm: object = field(default=None, init=False)

    # -- lifecycle --------------------------------------------------------------------------------
    def __enter__(self) -> NetBed:
        self._old_sigterm = signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        remove_stale_beds()
        global _beds_made
        _beds_made += 1
        self._tag = f"{PREFIX}{os.getpid()}b{_beds_made}"
        ports = list(self.delays_ms) + (["nat"] if self.nat else [])
        hub = self._add_ns("hub")
        spec = ",".join(f"{self.delays_ms.get(n, self.nat_delay_ms)}:{self.loss.get(n, 0.0)}" for n in ports)
        self._switch = subprocess.Popen(
            ["ip", "netns", "exec", hub, sys.executable, "-m", "llmswarm.bench.netbed_switch", self._tag, spec],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)
        taps = self._switch_line().split()
        if len(taps) != len(ports):
            raise NodeError(f"the switch made {len(taps)} TAPs for {len(ports)} nodes")
        for i, (name, tap) in enumerate(zip(ports, taps, strict=True)):
            ns = self._add_ns(name)
            ip = f"{SUBNET}.{10 + i}"
            _ip("link", "set", tap, "netns", ns, ns=hub)
            _ip("addr", "add", f"{ip}/24", "dev", tap, ns=ns)
            _ip("link", "set", tap, "up", ns=ns)
            if name != "nat":
                self.nodes[name] = Node(name, ns, ip, i, self.delays_ms[name], self.loss.get(name, 0.0))
            else:
                self._router(ns, tap, ip, i)

    def _router(self, router: str, tap: str, public_ip: str, port: int) -> None:
        """The NAT router namespace and, behind it, one namespace per NAT'd node on a veth each."""
        _in_ns(router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        if shutil.which("iptables") is None:
            raise NodeError("the NAT router needs iptables: apt-get install iptables")
        _in_ns(router, "iptables", "-t", "nat", "-A", "POSTROUTING", "-o", tap, "-j", "MASQUERADE")
        # no port forwarding: drop every connection the outside opens towards the private side
        _in_ns(router, "iptables", "-A", "FORWARD", "-i", tap, "-m", "conntrack", "--ctstate", "NEW", "-j", "DROP")
        self.nodes["nat"] = Node("nat", router, public_ip, port, self.nat_delay_ms, self.loss.get("nat", 0.0))
        for k, name in enumerate(self.nat):
            ns = self._add_ns(name)
            outside, inside = f"{self._tag[-6:]}r{k}", f"{self._tag[-6:]}h{k}"
            _ip("link", "add", outside, "type", "veth", "peer", "name", inside, ns=router)
            _ip("link", "set", inside, "netns", ns, ns=router)
            gw, ip = f"{PRIVATE_SUBNET}.{1 + 4 * k}", f"{PRIVATE_SUBNET}.{2 + 4 * k}"
            _ip("addr", "add", f"{gw}/30", "dev", outside, ns=router)
            _ip("link", "set", outside, "up", ns=router)
            _ip("addr", "add", f"{ip}/30", "dev", inside, ns=ns)
            _ip("link", "set", inside, "up", ns=ns)
            _ip("route", "add", "default", "via", gw, ns=ns)
            self.nodes[name] = Node(name, ns, ip, None, self.nat_delay_ms, self.loss.get("nat", 0.0))

    def _add_ns(self, name: str) -> str:
        ns = f"{self._tag}-{name}"
        _ip("netns", "add", ns)
        self._namespaces.append(ns)
        _ip("link", "set", "lo", "up", ns=ns)
        return ns

    def _switch_line(self) -> str:
        assert self._switch is not None and self._switch.stdout is not None
        ready, _, _ = select.select([self._switch.stdout], [], [], SWITCH_START_TIMEOUT_S)
        line = self._switch.stdout.readline() if ready else ""
        if not line:
            raise NodeError(f"the bed's switch did not answer within {SWITCH_START_TIMEOUT_S:g} s")
        return line

    def stop(self) -> None:
        """Processes (their groups), then the switch, then the namespaces; never raises."""
        for p in [*self._procs, *([self._switch] if self._switch else [])]:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for p in [*self._procs, *([self._switch] if self._switch else [])]:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()
            for f in (p.stdin, p.stdout, p.stderr):
                if f:
                    with contextlib.suppress(OSError):
                        f.close()
        self._procs, self._switch = [], None
        for ns in reversed(self._namespaces):
            _ip("netns", "del", ns, check=False)
        self._namespaces = []
        if self._old_sigterm is not None:
            signal.signal(signal.SIGTERM, self._old_sigterm)  # type: ignore[arg-type]
            self._old_sigterm = None

    # -- use --------------------------------------------------------------------------------------
    def popen(self, node: str, cmd: list[str], **kw: object) -> subprocess.Popen:
        """Start `cmd` inside `node`'s namespace; stopped with the bed (its whole process group)."""
        proc = subprocess.Popen(["ip", "netns", "exec", self.nodes[node].ns, *cmd], start_new_session=True,
                                **kw)  # type: ignore[call-overload]
        self._procs.append(proc)
        return proc

    def run(self, node: str, cmd: list[str], timeout_s: float) -> subprocess.CompletedProcess:
        proc = self.popen(node, cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            raise NodeError(f"{cmd[:4]} in {node} ran past {timeout_s:g} s; stderr: {err[-2000:]}") from None
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)

    def set_link(self, node: str, delay_ms: float | None = None, loss: float | None = None) -> None:
        """Change what `node` sends from now on (a NAT'd node: its router's link, shared)."""
        n = self.nodes[node]
        if n.port is None:
            n = self.nodes["nat"]
        n.delay_ms = n.delay_ms if delay_ms is None else delay_ms
        n.loss = n.loss if loss is None else loss
        assert self._switch is not None and self._switch.stdin is not None
        self._switch.stdin.write(f"{n.port} {n.delay_ms} {n.loss}\n")
        self._switch.stdin.flush()
        if self._switch_line().strip() != "ok":
            raise NodeError("the bed's switch refused a link change")

    def ping_rtt_ms(self, src: str, dst: str, count: int = 5) -> float:
        """Median RTT from src to dst as the kernel sees it: a TCP connect to a closed port is
        answered by a reset one round trip later (no `ping` binary needed)."""
        res = _in_ns(self.nodes[src].ns, sys.executable, "-c", _RTT_PROBE, self.nodes[dst].ip, str(count), check=False)
        try:
            return float(res.stdout.strip())
        except ValueError:
            raise NodeError(f"RTT probe {src} -> {dst} failed: {res.stderr.strip()[-300:]}") from None


_RTT_PROBE = """
import socket, statistics, sys, time
rtts = []
for _ in range(int(sys.argv[2])):
    s = socket.socket()
    s.settimeout(3)
    t0 = time.perf_counter()
    try:
        s.connect((sys.argv[1], 9))
    except ConnectionRefusedError:
        rtts.append(time.perf_counter() - t0)
    except OSError:
        pass
    s.close()
print(statistics.median(rtts) * 1000)
"""


_beds_made = 0  # beds this process has built: part of their names, so several may live at once


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


# -- a swarm in the bed -------------------------------------------------------------------------------
SWARM_START_TIMEOUT_S = 180.0  # servers load weights and measure themselves on shared cores


@dataclass
class BedSwarm:
    peers: list[str]  # the bootstrap's printed address (dialable inside the bed)
    ready: dict[str, dict]  # node -> its `join --json` ready record


def start_swarm(bed: NetBed, model: str, spans: dict[str, tuple[int, int]], *, boot: str = "boot",
                env: dict[str, str] | None = None, announce_period_s: float = 1.0) -> BedSwarm:
    """A bootstrap in `boot` and one `join` per entry of `spans` (node -> blocks), every one on a
    wildcard listen address with no --identity, as a person runs them on separate machines."""
    from llmswarm.bench.local_swarm import llmswarm_command

    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    b = bed.popen(boot, llmswarm_command("bootstrap", "--host", "0.0.0.0", "--port", "0"),
                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    peers = [_read_line(b, "bootstrap", SWARM_START_TIMEOUT_S).strip()]
    procs = {}
    for node, (start, end) in spans.items():
        procs[node] = bed.popen(node, llmswarm_command(
            "join", "--model", model, "--blocks", f"{start}:{end}", "--peers", *peers, "--host", "0.0.0.0",
            "--public-name", node, "--announce-period", str(announce_period_s), "--rebalance-period", "0", "--json"),
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    import json

    deadline = time.monotonic() + SWARM_START_TIMEOUT_S
    ready = {n: json.loads(_read_line(p, n, deadline - time.monotonic())) for n, p in procs.items()}
    return BedSwarm(peers, ready)


def _read_line(proc: subprocess.Popen, what: str, timeout_s: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], max(0.1, timeout_s))
    line = proc.stdout.readline() if ready else ""
    if not line:
        raise NodeError(f"{what} in the bed printed nothing within {timeout_s:.0f} s (exit code {proc.poll()})")
    return line


# -- check: a bed, its RTTs and its NAT --------------------------------------------------------------
def check() -> dict[str, object]:
    """Build a small bed and measure it: emulated vs measured RTTs, and that the NAT translates and
    refuses incoming connections."""
    report: dict[str, object] = {}
    with NetBed({"a": 5.0, "b": 30.0}, nat=["home"], nat_delay_ms=10.0) as bed:
        report["rtt_a_b_ms"] = {"emulated": 35.0, "ping": bed.ping_rtt_ms("a", "b")}
        report["rtt_home_b_ms"] = {"emulated": 40.0, "ping": bed.ping_rtt_ms("home", "b")}
        report["nat_source_seen_by_b"] = _seen_source(bed, "home", "b")
        report["inbound_to_home_refused"] = _inbound_refused(bed, "b", "home")
        bed.set_link("a", loss=0.5)
        report["rtt_a_b_ms_with_50pct_loss"] = bed.ping_rtt_ms("a", "b", count=9)
    return report


_ECHO_SERVER = ("import socket,sys;s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);"
                "s.bind(('0.0.0.0',int(sys.argv[1])));s.listen();print('up',flush=True);c,a=s.accept();"
                "print(a[0],flush=True)")


def _seen_source(bed: NetBed, client: str, server: str) -> str:
    """The source address `server` sees when `client` connects to it."""
    srv = bed.popen(server, [sys.executable, "-c", _ECHO_SERVER, "9777"], stdout=subprocess.PIPE, text=True)
    assert srv.stdout is not None
    srv.stdout.readline()
    _in_ns(bed.nodes[client].ns, sys.executable, "-c",
           f"import socket;socket.create_connection(('{bed.nodes[server].ip}',9777),timeout=5).close()")
    return srv.stdout.readline().strip()


def _inbound_refused(bed: NetBed, outside: str, inside: str) -> bool:
    srv = bed.popen(inside, [sys.executable, "-c", _ECHO_SERVER, "9778"], stdout=subprocess.PIPE, text=True)
    assert srv.stdout is not None
    srv.stdout.readline()
    for target in (bed.nodes[inside].ip, bed.nodes["nat"].ip):
        res = _in_ns(bed.nodes[outside].ns, sys.executable, "-c",
                     f"import socket;socket.create_connection(('{target}',9778),timeout=1.5).close()", check=False)
        if res.returncode == 0:
            return False
    return True


@contextlib.contextmanager
def _bed_or_exit() -> Iterator[None]:
    try:
        yield
    except KeyboardInterrupt:
        sys.exit(130)


def main(argv: list[str]) -> None:
    if argv[:1] == ["check"]:
        why = available()
        if why:
            sys.exit(why)
        with _bed_or_exit():
            import json

            print(json.dumps(check(), indent=2))
        return
    sys.exit("usage: python -m llmswarm.bench.netbed check")


if __name__ == "__main__":
    main(sys.argv[1:])
