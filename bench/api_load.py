"""`llmswarm bench api`: N concurrent streaming requests through `llmswarm api` on a local swarm.

One bootstrap, `servers` join processes splitting the model, one `llmswarm api` process; then for each
N (1, 4, 16 by default) N streaming /v1/completions requests at once, read as an OpenAI client reads
them (httpx on trio, one SSE event per chunk). Per N: aggregate decode tokens/s (every request's
tokens after its first, over the time from the first first-token to the last token) and its speedup
over the smallest N, time to first token (p50, p90) and inter-token latency (gaps between a stream's
text chunks, p50, p90). For the API's own cost, one `chat` through the same swarm gives the decode
tokens/s of the same chain without HTTP: `api_overhead_ms_per_token` = 1/api - 1/chat at N=1. Per N
also the API's mean head batch (node/client/batcher.py) and its CPU time per token; `compare` runs
each N on a second API process without head batching too, in turn, and `draft` on one with `--draft`
(speculative decoding: its tokens/s against the plain process's at the same N, and how many drafts
stood).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from llmswarm.bench.local_swarm import LocalSwarm, even_spans, llmswarm_command, model_arg
from llmswarm.models.registry import DEFAULT_DRAFT_TOKENS, resolve

PROMPT = "Once upon a time"  # a base-model continuation: long answers, rarely an early stop token
CHAT_PROMPT = "Tell me a long story about a dragon."


@dataclass
class Stream:
    sent: float
    chunks: list[float] = field(default_factory=list)  # arrival time of each chunk with text
    tokens: int = 0  # completion tokens (the usage chunk)


def _pct(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


async def _one(http: Any, model: str, tokens: int) -> Stream:
    body = {"model": model, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    s = Stream(time.perf_counter())
    async with http.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"the API answered {r.status_code}: {(await r.aread()).decode()[:300]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"the stream ended with an error: {chunk['error']['message']}")
            if chunk.get("usage"):
                s.tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["text"]:
                s.chunks.append(time.perf_counter())
    return s


async def _round(url: str, model: str, n: int, tokens: int) -> list[Stream]:
    import httpx
    import trio

    streams: list[Stream] = []
    limits = httpx.Limits(max_connections=n + 4)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http, trio.open_nursery() as nursery:
        async def run() -> None:
            try:
                streams.append(await _one(http, model, tokens))
            except RuntimeError as e:
                raise RuntimeError(f"{n} concurrent requests: {e}") from None

        for _ in range(n):
            nursery.start_soon(run)
    return streams


def summarize(n: int, streams: list[Stream]) -> dict[str, Any]:
    firsts = [s.chunks[0] for s in streams if s.chunks]
    lasts = [s.chunks[-1] for s in streams if s.chunks]
    decode = sum(max(0, s.tokens - 1) for s in streams)
    span = max(lasts) - min(firsts) if firsts else 0.0
    ttft = [s.chunks[0] - s.sent for s in streams if s.chunks]
    itl = [b - a for s in streams for a, b in zip(s.chunks, s.chunks[1:], strict=False)]
    return {"concurrent": n, "tokens": sum(s.tokens for s in streams),
            "decode_tokens_per_s": round(decode / span, 2) if span > 0 else 0.0,
            "per_request_tokens_per_s": round(decode / span / n, 2) if span > 0 else 0.0,
            "ttft_p50_ms": round(_pct(ttft, 0.5) * 1000, 1), "ttft_p90_ms": round(_pct(ttft, 0.9) * 1000, 1),
            "itl_p50_ms": round(_pct(itl, 0.5) * 1000, 1), "itl_p90_ms": round(_pct(itl, 0.9) * 1000, 1)}


def _chat_tokens_per_s(swarm: LocalSwarm, model: str, tokens: int) -> float:
    cmd = llmswarm_command("chat", "--model", model, "--prompt", CHAT_PROMPT, "--json", "-n", str(tokens),
                           "--peers", *swarm.peers)
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        raise RuntimeError(f"chat failed: {res.stderr.strip().splitlines()[-1:]}")
    return float(json.loads(res.stdout)["tokens_per_s"])


def _api_state(url: str, pid: int) -> dict[str, float]:
    """The API process's head batches so far (GET /v1/swarm) and CPU seconds (Linux /proc; else 0)."""
    import httpx

    api = httpx.get(url + "/v1/swarm", timeout=60).json().get("api", {})
    cpu = 0.0
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()  # noqa: SIM115 - read at once
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    except (OSError, ValueError, IndexError):
        pass
    draft = api.get("draft") or {}
    return {"rows": api.get("head_rows", 0), "batches": api.get("head_batches", 0), "cpu_s": cpu,
            "drafted": draft.get("drafted", 0), "accepted": draft.get("accepted", 0)}


def _measured(url: str, pid: int, model: str, n: int, tokens: int) -> dict[str, Any]:
    import trio

    before = _api_state(url, pid)
    row = summarize(n, trio.run(_round, url, model, n, tokens))
    after = _api_state(url, pid)
    batches = after["batches"] - before["batches"]
    row["mean_head_batch"] = round((after["rows"] - before["rows"]) / batches, 2) if batches else 0.0
    row["api_cpu_ms_per_token"] = round((after["cpu_s"] - before["cpu_s"]) * 1000 / max(1, row["tokens"]), 2)
    drafted = after["drafted"] - before["drafted"]
    if drafted:
        row["acceptance_rate"] = round((after["accepted"] - before["accepted"]) / drafted, 4)
    return row


def bench_api(model: str = "smollm2-135m", servers: int = 3, concurrency: Sequence[int] = (1, 4, 16),
              tokens: int = 32, compare: bool = False, draft: str | None = None,
              draft_tokens: int = DEFAULT_DRAFT_TOKENS,
              progress: Callable[[str, float, float | None], None] = lambda *a: None) -> dict:
    """`compare`: a second API process on the same swarm with `--no-batch-heads` (each request's head
    alone, as before HeadBatcher), each N run on both in turn: the in-run ratio is the figure that
    holds on a loaded machine. `draft`: likewise an API process with `--draft` (speculative decoding),
    its rows compared with the plain one's at the same N (`vs_plain`)."""
    import trio

    spec = resolve(model)
    spans = even_spans(spec.num_blocks, servers)
    # one API process is one client peer: let it take whole servers (a fair share is for many clients)
    with LocalSwarm(model_arg(spec), spans, progress=progress, extra_join_args=("--peer-share", "1")) as swarm:
        progress("starting llmswarm api", 0, 1)
        apis = {"batched": swarm.start_api("--max-concurrent", str(max(concurrency)))}
        if compare:
            apis["unbatched"] = swarm.start_api("--max-concurrent", str(max(concurrency)), "--no-batch-heads")
        if draft:
            apis["draft"] = swarm.start_api("--max-concurrent", str(max(concurrency)), "--draft", draft,
                                            "--draft-tokens", str(draft_tokens))
        pids = {label: p.pid for label, p in zip(apis, swarm.clients, strict=True)}
        for url in apis.values():
            trio.run(_round, url, spec.name, 1, 4)  # warm-up: route, dial, first session
        rows = []
        for i, n in enumerate(concurrency):
            progress("concurrent streams", i, len(concurrency))
            for label, url in apis.items():
                rows.append({"api": label, **_measured(url, pids[label], spec.name, n, tokens)})
        progress("chat through the same swarm", 0, 1)
        chat_tps = _chat_tokens_per_s(swarm, model_arg(spec), tokens)
    for label in apis:
        mine = [r for r in rows if r["api"] == label]
        base = mine[0]["decode_tokens_per_s"] or 1.0
        for r in mine:
            r["speedup"] = round(r["decode_tokens_per_s"] / base, 2)
    plain = {r["concurrent"]: r for r in rows if r["api"] == "batched"}
    for r in rows:
        base = plain[r["concurrent"]]["decode_tokens_per_s"] or 1.0
        if r["api"] == "unbatched":
            plain[r["concurrent"]]["vs_unbatched"] = round(base / (r["decode_tokens_per_s"] or 1.0), 2)
        elif r["api"] == "draft":
            r["vs_plain"] = round(r["decode_tokens_per_s"] / base, 2)
    first = rows[0]
    one = first["per_request_tokens_per_s"] if first["concurrent"] == 1 else None
    overhead = round((1 / one - 1 / chat_tps) * 1000, 2) if one and chat_tps else None
    return {"model": spec.name, "servers": servers, "spans": [f"{a}:{b}" for a, b in spans], "tokens": tokens,
            "draft": draft, "draft_tokens": draft_tokens if draft else None, "rows": rows,
            "chat_tokens_per_s": round(chat_tps, 2), "api_overhead_ms_per_token": overhead}
