"""`llmswarm api`: load the client's parts once, join the swarm as a client (one host, one
directory), keep a status snapshot fresh for the page, and serve the app with hypercorn's trio
worker until Ctrl-C. Everything runs on one trio loop: HTTP, libp2p and the generation loops of all
requests (their embeddings inline, as in `chat`; their heads as one batched call per round, by the
backend's HeadBatcher).
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import trio
from llmswarm.models.checkpoint import Progress, _noop
from llmswarm.models.local import ClientModel, load_client_model
from llmswarm.models.registry import resolve
from llmswarm.models.span import parse_dtype
from llmswarm.models.speculative import Drafter, draft_dtype, load_drafter
from llmswarm.node import config
from llmswarm.node.api.app import build_app
from llmswarm.node.api.sessions import BackendOptions, SwarmBackend
from llmswarm.node.discovery.directory import open_directory
from llmswarm.node.discovery.status import take_snapshot
from llmswarm.node.discovery.swarm_view import require_peers
from llmswarm.node.errors import NodeError
from llmswarm.node.host import Host, ephemeral_host, open_host, quiet_libp2p_logging


@dataclass
class ApiOptions:
    model: str = config.DEFAULT_MODEL
    peers: list[str] = field(default_factory=list)
    host: str = config.API_DEFAULT_HOST
    port: int = config.API_DEFAULT_PORT  # 0: any free port (the URL printed says which)
    api_key: str | None = None
    dtype: str | None = None
    device: str = "cpu"
    identity: str | None = None
    backend: BackendOptions = field(default_factory=BackendOptions)


class SwarmWatch:
    """The latest `status --json` snapshot (every model, ours listed even before a server has it)."""

    def __init__(self, model: ClientModel) -> None:
        self.sizes = {model.spec.name: model.cfg.num_blocks}
        self.snapshot: dict[str, Any] = {"time": 0.0, "models": [], "servers": []}

    async def run(self, host: Host, directory: Any) -> None:
        while True:
            with trio.move_on_after(config.REQUEST_TIMEOUT_S * 2):
                self.snapshot = await take_snapshot(host, directory, None, self.sizes, refresh=True)
            await trio.sleep(config.API_SWARM_PERIOD_S)

    def rtts(self) -> dict[str, float]:
        return {s["peer_id"]: s["rtt_s"] for s in self.snapshot["servers"] if s["rtt_s"] is not None}


def load_model(opts: ApiOptions, progress: Progress = _noop) -> ClientModel:
    """The client's parts (tokenizer, embeddings, head): what every request shares."""
    require_peers(opts.peers)  # before loading anything
    spec = resolve(opts.model)
    return load_client_model(spec, parse_dtype(opts.dtype, opts.device), opts.device, progress)


def load_draft(opts: ApiOptions, model: ClientModel, progress: Progress = _noop) -> Drafter | None:
    """The draft model's weights (`--draft`), shared by every request; None without one."""
    b = opts.backend
    if not b.draft:
        return None
    # requests fork it, each with its own cache: this one needs none
    return load_drafter(b.draft, model, 1, b.draft_tokens, progress, draft_dtype(b.draft_dtype, opts.device))


def run_api(opts: ApiOptions, model: ClientModel, ready: Callable[[str], None] = lambda _: None,
            drafter: Drafter | None = None) -> None:
    """Serve until SIGINT or SIGTERM; `ready(url)` once the port is bound (the swarm asked once).
    On a signal, requests in flight get API_SHUTDOWN_GRACE_S to finish; then their sessions close."""

    async def main() -> None:
        shutdown = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_until_signal, shutdown)
            await serve_api(opts, model, ready, shutdown, drafter)
            nursery.cancel_scope.cancel()

    # Every request's generation loop holds `torch.inference_mode()` open across its yields
    # (models/generate.py), and the mode is per thread: with many requests on one loop, the first to
    # finish switched it off under the others ("inplace update to inference tensor outside
    # InferenceMode"). This process computes no gradients, so the whole loop runs in the mode.
    with torch.inference_mode():
        trio.run(main)


async def _until_signal(shutdown: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            shutdown.set()
            return


async def serve_api(opts: ApiOptions, model: ClientModel, ready: Callable[[str], None],
                    shutdown: trio.Event | None = None, drafter: Drafter | None = None) -> None:
    from hypercorn.config import Config
    from hypercorn.trio import serve

    quiet_libp2p_logging()
    cfg = Config()
    cfg.bind = [f"{opts.host}:{opts.port}"]
    cfg.accesslog = None
    cfg.loglevel = "WARNING"  # our own line says where we listen; hypercorn reports only failures (stderr)
    cfg.graceful_timeout = config.API_SHUTDOWN_GRACE_S
    host_cm = open_host(opts.identity) if opts.identity else ephemeral_host()
    async with host_cm as host, open_directory(host, opts.peers, None, gossip=False) as directory, \
            trio.open_nursery() as nursery:
        watch = SwarmWatch(model)
        nursery.start_soon(watch.run, host, directory)
        backend = SwarmBackend(host, directory, model, opts.backend, watch.rtts, drafter)
        nursery.start_soon(backend.batcher.serve)
        app = build_app(backend, lambda: {**watch.snapshot, "api": backend.stats()}, opts.api_key)
        trigger = shutdown.wait if shutdown is not None else None

        async def serve_then_stop(task_status: trio.TaskStatus[list[str]]) -> None:
            await serve(app, cfg, shutdown_trigger=trigger, task_status=task_status)
            nursery.cancel_scope.cancel()  # served its last request: stop watching the swarm

        try:
            binds = await nursery.start(serve_then_stop)
        except OSError as e:
            raise NodeError(f"cannot listen on {opts.host}:{opts.port} ({e.strerror or e}): "
                            "pick another --port (0: any free one)") from None
        ready(binds[0])
