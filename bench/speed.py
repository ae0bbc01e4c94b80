"""`llmswarm bench swarm` and `llmswarm bench server`: decode speed measured through real processes.

`bench_swarm`: one process holds both the whole model as one local span and a client session
through N server processes on 127.0.0.1 (started by LocalSwarm). Rounds alternate local / swarm on
the same prompt, greedy, a fixed number of new tokens with no early stop; the figures are medians
over rounds.

`bench_server`: ONE server process holding every block, and N concurrent sessions on it from this
process (one trio task each, all through one ephemeral host, so one libp2p connection). Each session
sends a fixed prompt's embeddings as its prefill, then decode steps of one token each; the hidden
states are computed once and reused, so the client spends no time on an LM head and the figures are
the server's: aggregate decode tokens/s for each N, and how much more N sessions get than one.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from typing import Any

import torch
import trio
from llmswarm.bench.local_swarm import LocalSwarm, even_spans, model_arg
from llmswarm.models.chat import Conversation
from llmswarm.models.checkpoint import Checkpoint
from llmswarm.models.device import dtype_name, resolve_device
from llmswarm.models.fetch import locate
from llmswarm.models.generate import GenerationResult, Sampler, Sampling, generation_steps, run_sync
from llmswarm.models.local import LocalChain, load_client_model
from llmswarm.models.registry import resolve
from llmswarm.models.span import load_client, load_span, parse_dtype
from llmswarm.node import config
from llmswarm.node.client.chat import drive
from llmswarm.node.client.session import open_session
from llmswarm.node.discovery.directory import open_directory
from llmswarm.node.discovery.swarm_view import dial_records, live_records
from llmswarm.node.errors import PeerError
from llmswarm.node.host import Host, ephemeral_host, quiet_libp2p_logging
from llmswarm.routing import Hop

PROMPT = "Write a short story about a lighthouse keeper."


def _row(result: GenerationResult) -> dict[str, float]:
    steps = len(result.token_ids) - 1
    return {"tokens_per_s": result.tokens_per_s, "step_ms": 1000 * result.decode_s / steps,
            "ttft_ms": 1000 * result.time_to_first_token_s}


def bench_swarm(model: str = "smollm2-135m", servers: int = 3, rounds: int = 3, new_tokens: int = 64,
                dtype: str | None = None, progress: Callable[..., None] = lambda *a: None,
                device: str = "auto") -> dict[str, Any]:
    """The servers and the local reference both run on `device` (several servers share one GPU)."""
    quiet_libp2p_logging()
    spec = resolve(model)
    dev = resolve_device(device)
    torch_dtype = parse_dtype(dtype, dev)
    client = load_client_model(spec, torch_dtype, dev, progress, with_blocks=True)
    cfg = client.cfg
    local = LocalChain([load_span(client.ckpt, 0, cfg.num_blocks, torch_dtype, dev, progress)],
                       max_length=new_tokens + 256)
    prompt = Conversation(client.tokenizer).prompt_ids(PROMPT)
    greedy = Sampler(Sampling())

    def steps():
        return generation_steps(client.parts, prompt, 0, new_tokens, greedy, stop_ids=set())

    spans = even_spans(cfg.num_blocks, servers)
    with LocalSwarm(model_arg(spec), spans, announce_period_s=2.0, dtype=dtype_name(torch_dtype), progress=progress,
                    extra_join_args=("--device", dev)) as swarm:
        announce_s = [r["seconds_to_announce"] for r in swarm.ready]
        process_s = [r["seconds_process_to_announced"] for r in swarm.ready]

        async def run() -> tuple[dict[str, list], bool, dict[str, Any]]:
            async with ephemeral_host() as host, open_directory(host, swarm.peers, [spec.name], gossip=False) as d:
                with trio.fail_after(30):
                    while len(recs := live_records(d.records(spec.name), spec.name)) < servers:
                        await trio.sleep(0.2)
                        await d.refresh()
                await dial_records(host, recs)
                by_start = {r.start: r.peer_id for r in recs}
                chain = [Hop(by_start[a], a, b) for a, b in spans]
                length = new_tokens + 256
                async with AsyncExitStack() as stack:
                    async def opened(**kw: Any) -> Any:
                        session = await stack.enter_async_context(
                            open_session(host, chain, spec.name, cfg.hidden_size, length, torch_dtype, **kw))
                        await drive(steps(), session.step)  # warm up now: a session idle too long is closed
                        return session

                    relayed = await opened()
                    host.use_direct = False  # the same chain, relayed, every stream on libp2p
                    over_libp2p = await opened()
                    host.use_direct = True
                    direct = await opened(relay=False)
                    sessions = {"swarm": relayed, "swarm_libp2p": over_libp2p, "swarm_no_relay": direct}
                    streams = {k: sum(s.stream.direct for s in v.spans) for k, v in sessions.items()}
                    reference = run_sync(steps(), local)  # also warms the local path up once
                    rows: dict[str, list] = {"local": [], **{k: [] for k in sessions}}
                    same = True
                    for i in range(rounds):
                        progress("benchmark rounds", i, rounds)
                        a = run_sync(steps(), local)
                        rows["local"].append(_row(a))
                        for k, session in sessions.items():  # alternated within each round
                            b = await drive(steps(), session.step)
                            same = same and a.token_ids == b.token_ids
                            rows[k].append(_row(b))
                    progress("benchmark rounds", rounds, rounds)
                    pairs = relayed.relayed_pairs
                    # wire precision: the last hop's output for the prompt, and the greedy tokens
                    x = client.parts.embed(torch.tensor([prompt], device=dev)).to(torch_dtype)
                    exact = await direct.step(x, 0)
                wire: dict[str, Any] = {}
                for name, wdt in (("bfloat16", torch.bfloat16), ("float16", torch.float16)):
                    async with open_session(host, chain, spec.name, cfg.hidden_size, length, torch_dtype,
                                            wire_dtype=wdt) as session:
                        out = await session.step(x, 0)
                        result = await drive(steps(), session.step)
                    agree = next((i for i, (p, q) in enumerate(zip(result.token_ids, reference.token_ids,
                                                                    strict=False)) if p != q),
                                 min(len(result.token_ids), len(reference.token_ids)))
                    wire[name] = {"max_abs_diff": float((out - exact).abs().max()),
                                  "max_abs": float(exact.abs().max()),
                                  "token_identical": result.token_ids == reference.token_ids,
                                  "tokens_agreeing_before_first_difference": agree}
                return rows, same, {"relayed_pairs": pairs, "wire_dtype": wire, "direct_streams": streams}

        started = time.perf_counter()
        rows, identical, extra = trio.run(run)
    med = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in rows.items()}
    added_ms = (med["swarm"]["step_ms"] - med["local"]["step_ms"]) / servers
    return {
        "model": spec.name, "dtype": str(torch_dtype).removeprefix("torch."), "device": dev, "servers": servers,
        "spans": [f"{a}:{b}" for a, b in spans], "rounds": rounds, "new_tokens": new_tokens,
        "local": med["local"], "swarm": med["swarm"], "swarm_libp2p": med["swarm_libp2p"],
        "swarm_no_relay": med["swarm_no_relay"],
        "ratio": med["swarm"]["tokens_per_s"] / med["local"]["tokens_per_s"],
        "ratio_libp2p": med["swarm_libp2p"]["tokens_per_s"] / med["local"]["tokens_per_s"],
        "ratio_no_relay": med["swarm_no_relay"]["tokens_per_s"] / med["local"]["tokens_per_s"],
        "added_ms_per_hop_per_step": added_ms,
        "added_ms_per_hop_per_step_libp2p": (med["swarm_libp2p"]["step_ms"] - med["local"]["step_ms"]) / servers,
        "added_ms_per_hop_per_step_no_relay": (med["swarm_no_relay"]["step_ms"] - med["local"]["step_ms"]) / servers,
        "token_identical": identical, **extra,
        "seconds_join_to_announced": announce_s, "seconds_process_start_to_announced": process_s,
        "bench_seconds": time.perf_counter() - started,
        "rounds_detail": rows,
    }


# -- bench server ------------------------------------------------------------------------------------

SERVER_SESSIONS = (1, 4, 16)
SERVER_PROMPT_TOKENS = 32
SERVER_DECODE_TOKENS = 32
SERVER_WARMUP_STEPS = 4
# Room left in each session's cache beyond prompt + steps: the server refuses a step past max_length.
_CACHE_MARGIN = 8


def _client_parts(spec: Any, dtype: torch.dtype, progress: Callable[..., None]) -> tuple[Checkpoint, Any]:
    """Embeddings (and head) only, without a tokenizer: the bench makes up its token ids, so a bare
    checkpoint folder (as the tests' tiny models are) is enough."""

    ckpt = Checkpoint.open(locate(spec, progress, Checkpoint.client_keys))
    return ckpt, load_client(ckpt, dtype, "cpu", progress)


def _server_args(sessions: int, max_length: int) -> tuple[str, ...]:
    """Raise the server's limits only when the bench needs more than its defaults allow (its one client
    may take the whole server: a fair share is for servers with many clients)."""
    args: tuple[str, ...] = ("--peer-share", "1") if sessions > 1 else ()
    if sessions > config.DEFAULT_MAX_SESSIONS:
        args += ("--max-sessions", str(sessions))
    if sessions * max_length > config.DEFAULT_CACHE_TOKENS:
        args += ("--cache-tokens", str(sessions * max_length))
    return args


async def _dial(host: Host, ready: dict[str, Any]) -> None:
    for addr in ready["addrs"]:
        full = addr if "/p2p/" in addr else f"{addr}/p2p/{ready['peer_id']}"
        try:
            await host.connect(full)
            return
        except PeerError:
            continue
    raise PeerError(f"could not connect to the bench server at {', '.join(ready['addrs'])}")


async def _concurrent_sessions(host: Host, hop: Hop, model: str, n: int, prompt: torch.Tensor, step: torch.Tensor,
                               max_length: int, tokens: int | None, seconds: float | None,
                               progress: Callable[..., None], label: str = "") -> dict[str, Any]:
    """N sessions at once: all open and prefill, then all decode from one common start; the decode
    window ends when the last session finishes its steps (or the time is up)."""
    hidden_size, p = prompt.shape[-1], prompt.shape[1]
    max_steps = max_length - p - _CACHE_MARGIN
    steps_wanted = min(tokens, max_steps) if tokens is not None else max_steps
    label = label or f"{n} concurrent session{'s' if n > 1 else ''}"
    prefilled, go, finished = 0, trio.Event(), trio.Event()
    done_count = 0
    t_open = time.perf_counter()
    t0 = 0.0
    latencies: list[list[float]] = [[] for _ in range(n)]
    ends = [0.0] * n
    first_out: list[torch.Tensor | None] = [None] * n

    async def one(i: int) -> None:
        nonlocal prefilled, t0, done_count
        async with open_session(host, [hop], model, hidden_size, max_length, prompt.dtype) as session:
            await session.step(prompt, 0)
            prefilled += 1
            if prefilled == n:  # the last one to finish its prefill starts everyone's decode clock
                t0 = time.perf_counter()
                go.set()
            await go.wait()
            deadline = t0 + seconds if seconds is not None else None
            lat = latencies[i]
            for k in range(steps_wanted):
                if deadline is not None and k and time.perf_counter() >= deadline:
                    break  # every session decodes at least one step, however short the time
                started = time.perf_counter()
                out = await session.step(step, p + k)
                lat.append(time.perf_counter() - started)
                if k == 0:
                    first_out[i] = out
                if i == 0:
                    if seconds is not None:
                        progress(label, min(time.perf_counter() - t0, seconds), seconds)
                    else:
                        progress(label, k + 1, steps_wanted)
            ends[i] = time.perf_counter()
            done_count += 1
            if done_count == n:
                finished.set()
            await finished.wait()  # no session closes (server work) while others are still measured

    progress(label, 0, seconds if seconds is not None else steps_wanted)
    async with trio.open_nursery() as nursery:
        for i in range(n):
            nursery.start_soon(one, i)
    progress(label, seconds if seconds is not None else steps_wanted, seconds if seconds is not None else steps_wanted)
    decode_s = max(ends) - t0
    steps_done = [len(lat) for lat in latencies]
    all_ms = sorted(1000 * x for lat in latencies for x in lat)
    per_session = [s / (e - t0) for s, e in zip(steps_done, ends, strict=True) if e > t0]
    return {
        "sessions": n,
        "aggregate_tokens_per_s": sum(steps_done) / decode_s,
        "per_session_tokens_per_s": statistics.mean(per_session),
        "per_session_tokens_per_s_min": min(per_session),
        "step_ms_mean": statistics.mean(all_ms),
        "step_ms_median": statistics.median(all_ms),
        "step_ms_p90": all_ms[min(len(all_ms) - 1, int(0.9 * len(all_ms)))],
        "decode_tokens": sum(steps_done),
        "decode_s": decode_s,
        "open_and_prefill_s": t0 - t_open,
        "_first_outputs": first_out,
    }


def bench_server(model: str = "smollm2-135m", sessions: Sequence[int] = SERVER_SESSIONS,
                 tokens: int | None = SERVER_DECODE_TOKENS, seconds: float | None = None,
                 prompt_tokens: int = SERVER_PROMPT_TOKENS, dtype: str | None = None,
                 warmup_steps: int = SERVER_WARMUP_STEPS,
                 progress: Callable[..., None] = lambda *a: None, device: str = "auto",
                 quant: str = "none") -> dict[str, Any]:
    """One server process with every block of `model`; for each N in `sessions`, N concurrent sessions
    each prefill `prompt_tokens` and decode `tokens` steps (or for `seconds` when given). Returns the
    record `llmswarm bench server` shows: per N aggregate and per-session tokens/s, step latency, and
    the speedup over the smallest N. The server runs on `device` with `quant`; this process on CPU."""
    ns = sorted(set(sessions))
    if not ns or ns[0] < 1:
        raise ValueError("sessions must be positive integers")
    if (tokens is None) == (seconds is None):
        raise ValueError("give exactly one of tokens and seconds")
    quiet_libp2p_logging()
    spec = resolve(model)
    dev = resolve_device(device)
    torch_dtype = parse_dtype(dtype, dev)
    ckpt, parts = _client_parts(spec, torch_dtype, progress)
    cfg = ckpt.config
    if tokens is not None:
        max_length = prompt_tokens + max(tokens, warmup_steps) + _CACHE_MARGIN
    else:  # as long as the server's default cache lets the largest N have, within one session's limit
        max_length = min(config.MAX_SESSION_LENGTH, max(config.DEFAULT_CACHE_TOKENS // ns[-1],
                                                        prompt_tokens + warmup_steps + 2 * _CACHE_MARGIN))
    if max_length > config.MAX_SESSION_LENGTH:
        raise ValueError(f"prompt + tokens must stay under {config.MAX_SESSION_LENGTH - _CACHE_MARGIN}")
    # Made-up but fixed token ids: the server's work does not depend on which tokens they are.
    ids = (torch.arange(prompt_tokens) * 7919 + 11) % cfg.vocab_size
    with torch.inference_mode():
        prompt = parts.embed(ids[None]).to(torch_dtype).clone()
        step = parts.embed(ids[None, -1:]).to(torch_dtype).clone()
    del parts

    with LocalSwarm(model_arg(spec), [(0, cfg.num_blocks)], announce_period_s=5.0, dtype=dtype_name(torch_dtype),
                    extra_join_args=(*_server_args(ns[-1], max_length), "--device", dev, "--quant", quant),
                    progress=progress) as swarm:
        ready = swarm.ready[0]
        hop = Hop(ready["peer_id"], 0, cfg.num_blocks)

        async def run() -> tuple[dict, list[dict]]:
            async with ephemeral_host() as host:
                await _dial(host, ready)
                warm = await _concurrent_sessions(host, hop, ready["model"], 1, prompt, step, max_length,
                                                  warmup_steps, None, progress, label="warming up")
                rows = []
                for n in ns:
                    rows.append(await _concurrent_sessions(host, hop, ready["model"], n, prompt, step, max_length,
                                                           tokens, seconds, progress))
                return warm, rows

        started = time.perf_counter()
        warm, rows = trio.run(run)
        bench_s = time.perf_counter() - started
    reference = warm["_first_outputs"][0]
    base = rows[0]["aggregate_tokens_per_s"]
    for r in rows:
        outs = r.pop("_first_outputs")
        # The same prompt at the same position must give the same output whatever else the server
        # runs at the time: 0.0 on a server that runs sessions one by one; batching may move it a little.
        r["max_abs_diff_vs_single"] = max(float((o - reference).abs().max()) for o in outs if o is not None)
        r["speedup"] = r["aggregate_tokens_per_s"] / base
    return {
        "model": ready["model"], "dtype": str(torch_dtype).removeprefix("torch."), "device": dev, "quant": quant,
        "blocks": cfg.num_blocks,
        "hidden_size": cfg.hidden_size, "prompt_tokens": prompt_tokens, "tokens": tokens, "seconds": seconds,
        "session_max_length": max_length, "warmup_steps": warmup_steps, "speedup_baseline_sessions": ns[0],
        "reference_output_abs_max": float(reference.abs().max()),  # the scale max_abs_diff_vs_single is on
        # The server's own measurement at start-up: one session's decode steps in-process, no network.
        "server_in_process_tokens_per_s": ready.get("throughput"),
        "seconds_process_start_to_announced": ready.get("seconds_process_to_announced"),
        "runs": rows, "bench_seconds": bench_s,
    }
