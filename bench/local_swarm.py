"""A whole swarm on this machine: one bootstrap and N `join` processes splitting a model.

Used by `llmswarm demo`, `llmswarm bench swarm` and the end-to-end tests. Every process it starts
is a real `llmswarm` process on 127.0.0.1 with its own identity (a key file in the work folder, or
with `key_files=False` no --identity flag at all: each process takes a free key of the default
folder, as a user's processes do), and every one of them is stopped on any exit (SIGTERM, then
SIGKILL after a grace period), Ctrl-C included.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from llmswarm.models.registry import ModelSpec
from llmswarm.node.errors import NodeError

START_TIMEOUT_S = 120.0  # a join process loads weights and measures itself before it is ready
STOP_GRACE_S = 5.0


def even_spans(num_blocks: int, servers: int) -> list[tuple[int, int]]:
    if not 0 < servers <= num_blocks:
        raise NodeError(f"cannot split {num_blocks} blocks among {servers} servers")
    bounds = [round(i * num_blocks / servers) for i in range(servers + 1)]
    return list(zip(bounds, bounds[1:], strict=False))


def _colocated_env() -> dict[str, str]:
    """Servers on one machine take turns on the same cores: after its step, a server's OpenMP
    threads must sleep at once instead of spinning (GNU OpenMP's default), or they steal the cores
    the next server in the chain needs. LLMSWARM_SERVER_OMP_WAIT overrides (ACTIVE to compare)."""
    env = {}
    if os.environ.get("LLMSWARM_SERVER_OMP_WAIT"):
        env["OMP_WAIT_POLICY"] = os.environ["LLMSWARM_SERVER_OMP_WAIT"]
    if os.environ.get("LLMSWARM_SERVER_THREADS"):
        env["OMP_NUM_THREADS"] = os.environ["LLMSWARM_SERVER_THREADS"]
    return env


def model_arg(spec: ModelSpec) -> str:
    """What to pass to child processes' --model: a folder's absolute path (its name would not resolve
    to it, and the children may run elsewhere), else the registry name."""
    return str(Path(spec.local_path).resolve()) if spec.local_path is not None else spec.name


def llmswarm_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "llmswarm.cli.app", *args]


class LocalSwarm:
    def __init__(self, model: str, spans: list[tuple[int, int]], *, announce_period_s: float = 5.0,
                 dtype: str | None = None, extra_join_args: tuple[str, ...] = (),
                 progress: Callable[[str, float, float | None], None] = lambda *a: None,
                 workdir: str | None = None, server_env: dict[str, str] | None = None,
                 rebalance_period_s: float = 0.0, key_files: bool = True,
                 server_kwargs: dict[int, dict] | None = None) -> None:
        self.model, self.spans = model, spans
        self.announce_period_s, self.dtype = announce_period_s, dtype
        self.extra_join_args = extra_join_args
        self.rebalance_period_s = rebalance_period_s
        self.key_files = key_files
        self.server_kwargs = server_kwargs or {}  # server index -> start_server's launcher / env
        self.server_env = server_env if server_env is not None else _colocated_env()
        self.progress = progress
        self._tmp = tempfile.TemporaryDirectory(prefix="llmswarm-") if workdir is None else None
        self.workdir = Path(workdir or self._tmp.name)
        self.bootstrap: subprocess.Popen | None = None
        self.servers: list[subprocess.Popen] = []
        self.clients: list[subprocess.Popen] = []  # e.g. `llmswarm api` processes (start_api)
        self.ready: list[dict] = []
        self.peers: list[str] = []
        self._spawned: dict[int, float] = {}  # pid -> monotonic time it was started
        self._logs: dict[int, Path] = {}  # pid -> its stderr (gone with the work folder on stop)

    # -- lifecycle --------------------------------------------------------------------------------
    def __enter__(self) -> LocalSwarm:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self.bootstrap = self._spawn("bootstrap", "--port", "0", *self._identity("bootstrap"))
        self.peers = [self._read_line(self.bootstrap, "bootstrap").strip()]
        for i, (start, end) in enumerate(self.spans):
            self.start_server(i, start, end, **self.server_kwargs.get(i, {}))
        for i, proc in enumerate(self.servers):
            self.progress(f"starting {len(self.spans)} servers", i, len(self.spans))
            ready = json.loads(self._read_line(proc, f"server {i}"))
            ready["seconds_process_to_announced"] = round(time.monotonic() - self._spawned[proc.pid], 3)
            self.ready.append(ready)
        self.progress(f"starting {len(self.spans)} servers", len(self.spans), len(self.spans))

    def start_server(self, i: int, start: int, end: int, *extra: str, launcher: list[str] | None = None,
                     env: dict[str, str] | None = None) -> subprocess.Popen:
        """Server i on blocks start:end. `launcher`: the command that stands for `llmswarm` (a test's
        wrapper script that alters the server); `env`: more environment for this server alone."""
        args = ["join", "--model", self.model, "--blocks", f"{start}:{end}", "--peers", *self.peers,
                *self._identity(f"server{i}"), "--public-name", f"server{i}",
                "--announce-period", str(self.announce_period_s), "--json",
                # servers sharing one machine measure each other's load: only move when asked to
                "--rebalance-period", str(self.rebalance_period_s), *self.extra_join_args, *extra]
        if self.dtype:
            args += ["--dtype", self.dtype]
        proc = self._spawn(*args, launcher=launcher, env=env)
        if i < len(self.servers):
            self.servers[i] = proc
        else:
            self.servers.append(proc)
        return proc

    def start_api(self, *extra: str) -> str:
        """An `llmswarm api` process on this swarm, on a free port of 127.0.0.1, stopped with the
        swarm (first, so it closes its sessions while the servers are still there); returns its URL."""
        proc = self._spawn("api", "--model", self.model, "--peers", *self.peers, "--port", "0", *extra)
        self.clients.append(proc)
        return self._read_line(proc, "api").strip()

    def stop(self) -> None:
        procs = [p for p in [*self.clients, *self.servers, self.bootstrap] if p is not None and p.poll() is None]
        for p in procs:
            p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for p in [*self.clients, *self.servers, self.bootstrap]:
            if p is not None:
                for f in (p.stdout, p.stderr):
                    if f:
                        f.close()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    # -- helpers ----------------------------------------------------------------------------------
    def _identity(self, name: str) -> list[str]:
        return ["--identity", str(self.workdir / f"{name}.key")] if self.key_files else []

    def _spawn(self, *args: str, launcher: list[str] | None = None,
               env: dict[str, str] | None = None) -> subprocess.Popen:
        path = self.workdir / f"{args[0]}-{len(self.servers)}.log"
        log = open(path, "w")  # noqa: SIM115 - lives with the process
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.server_env, **(env or {})}
        command = [*launcher, *args] if launcher else llmswarm_command(*args)
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True, env=env,
                                start_new_session=True)  # Ctrl-C reaches only us; we stop them in order
        self._spawned[proc.pid] = time.monotonic()
        self._logs[proc.pid] = path
        return proc

    def _read_line(self, proc: subprocess.Popen, what: str, timeout_s: float = START_TIMEOUT_S) -> str:
        assert proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if sel.select(timeout=0.5):
                line = proc.stdout.readline()
                if line:
                    return line
            if proc.poll() is not None:
                raise NodeError(f"{what} exited with code {proc.returncode} before it was ready: "
                                f"{self._last_line(proc.pid)}")
        raise NodeError(f"{what} was not ready within {timeout_s:g} s")

    def _last_line(self, pid: int) -> str:
        """The child's own last word on stderr (its one-line error), read before the folder is removed."""
        try:
            lines = [ln.strip() for ln in self._logs[pid].read_text(errors="replace").splitlines() if ln.strip()]
        except (KeyError, OSError):
            return "(no log)"
        return lines[-1][:500] if lines else "(it printed nothing)"
