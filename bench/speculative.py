"""`llmswarm bench swarm --draft`: speculative decoding against plain greedy, through a swarm and locally,
in one run, optionally over the WAN test bed (`--link-ms`: bench/netbed.py, network namespaces whose
every packet is delayed that long one way).

Every figure comes from real `llmswarm chat --json` processes (greedy, the same prompt), alternated
round by round: `chat --local` with and without each draft, then `chat` through the swarm with and
without each draft (inside the bed's client namespace with `--link-ms`). Each process reports its own
decode tokens/s (after the first step, so model loading and the prompt do not count), its swarm steps
and, with a draft, the draft tokens accepted. The figures are medians over rounds; every answer is
compared with `chat --local` token for token.

`--draft random` is a random-init model made here with the target's config cut to two small blocks and
its tokenizer: a draft that is almost never right, the case the K rule must make harmless.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmswarm.bench.local_swarm import LocalSwarm, even_spans, llmswarm_command, model_arg
from llmswarm.models.checkpoint import Checkpoint
from llmswarm.models.fetch import locate
from llmswarm.models.registry import resolve
from llmswarm.node.errors import NodeError

PROMPT = "Write a short story about a lighthouse keeper."
CHAT_TIMEOUT_S = 600.0


def make_random_draft(target_folder: Path, dest: Path, layers: int = 2, hidden: int = 64) -> Path:
    """A random-init Llama with the target's vocabulary and tokenizer files, saved in `dest`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = json.loads((target_folder / "config.json").read_text())
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=cfg["vocab_size"], hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        tie_word_embeddings=True, bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"))).eval()
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(dest), safe_serialization=True)
    for f in target_folder.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")):
            shutil.copy(f, dest / f.name)
    return dest


def _chat(run: Callable[[list[str]], subprocess.CompletedProcess], tokens: int, *args: str) -> dict[str, Any]:
    res = run(llmswarm_command("chat", "--prompt", PROMPT, "--json", "-n", str(tokens), *args))
    if res.returncode != 0:
        raise NodeError(f"`chat {' '.join(args)}` failed: {res.stderr.strip().splitlines()[-1:]}")
    return json.loads(res.stdout)


def _run_here(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=CHAT_TIMEOUT_S)


def bench_speculative(model: str = "smollm2-135m", drafts: list[str] | None = None, servers: int = 3,
                      rounds: int = 3, new_tokens: int = 64, link_ms: float | None = None,
                      draft_tokens: int | None = None, progress: Callable[..., None] = lambda *a: None,
                      workdir: Path | None = None, draft_dtype: str | None = None) -> dict[str, Any]:
    """Plain greedy and greedy with each of `drafts`, locally and through `servers` servers (over the
    WAN bed at `link_ms` one way per namespace when given)."""
    drafts = drafts or [model]
    spec = resolve(model)
    folder = locate(spec, progress)
    cfg = Checkpoint.open(folder).config
    spans = even_spans(cfg.num_blocks, servers)
    work = workdir or Path(os.environ.get("TMPDIR", "/tmp")) / f"llmswarm-bench-draft-{os.getpid()}"
    draft_args = {}
    for d in drafts:
        path = str(make_random_draft(folder, work / "random-draft")) if d == "random" else d
        draft_args[d] = (["--draft", path] + (["--draft-tokens", str(draft_tokens)] if draft_tokens else [])
                         + (["--draft-dtype", draft_dtype] if draft_dtype else []))
    variants = {"plain": [], **{f"draft {d}": a for d, a in draft_args.items()}}
    rows: dict[str, list[dict[str, Any]]] = {f"{where} {v}": [] for where in ("local", "swarm") for v in variants}
    started = time.perf_counter()
    try:
        with _swarm(spec, model, spans, link_ms, progress) as (peers, run_client):
            for r in range(rounds):
                progress("benchmark rounds", r, rounds)
                for v, args in variants.items():
                    m = ["--model", model_arg(spec)]
                    rows[f"local {v}"].append(_chat(_run_here, new_tokens, "--local", *m, *args))
                    rows[f"swarm {v}"].append(_chat(run_client, new_tokens, *m, "--peers", *peers, *args))
            progress("benchmark rounds", rounds, rounds)
    finally:
        if workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    reference = rows["local plain"][0]["token_ids"]
    out: dict[str, Any] = {}
    for k, answers in rows.items():
        tps = statistics.median(a["tokens_per_s"] for a in answers)
        row = {"tokens_per_s": tps, "ms_per_token": 1000 / tps if tps else None,
               "token_identical": all(a["token_ids"] == reference for a in answers),
               "tokens_per_step": statistics.median(len(a["token_ids"]) / max(1, a["steps"]) for a in answers)}
        if answers[0].get("draft"):
            row["acceptance_rate"] = statistics.median(a["draft"]["acceptance_rate"] for a in answers)
            row["proposals_drafted_ahead"] = statistics.median(a["draft"]["proposals_drafted_ahead"] for a in answers)
            # where a turn's time went (models/speculative.py: draft_stats), medians over the rounds
            row["ms_by_phase"] = {p: statistics.median(a["draft"]["ms"][p] for a in answers)
                                  for p in answers[0]["draft"]["ms"]}
            row["draft_ms_per_forward"] = statistics.median(a["draft"]["draft_ms_per_forward"] or 0 for a in answers)
        out[k] = row
    floor_ms = (link_ms or 0.0) * (servers + 1)
    ratios = {}
    for v in variants:
        if v == "plain":
            continue
        ratios[f"swarm {v} / swarm plain"] = out[f"swarm {v}"]["tokens_per_s"] / out["swarm plain"]["tokens_per_s"]
        ratios[f"local {v} / local plain"] = out[f"local {v}"]["tokens_per_s"] / out["local plain"]["tokens_per_s"]
    for v in variants:
        ratios[f"swarm {v} / local plain"] = out[f"swarm {v}"]["tokens_per_s"] / out["local plain"]["tokens_per_s"]
    return {
        "model": spec.name, "servers": servers, "spans": [f"{a}:{b}" for a, b in spans], "rounds": rounds,
        "new_tokens": new_tokens, "link_ms_one_way": link_ms, "drafts": drafts, "draft_tokens": draft_tokens,
        "draft_dtype": draft_dtype,
        # with relay a swarm step crosses servers + 1 links, each delayed link_ms: the least a step costs
        "link_floor_ms_per_step": floor_ms, "rows": out, "ratios": ratios,
        "load_avg_1m": os.getloadavg()[0], "bench_seconds": time.perf_counter() - started,
    }


class _swarm:
    """The swarm the rounds run through: on loopback (LocalSwarm), or in the WAN bed with the client in
    its own namespace. Yields (bootstrap addresses, a runner for a client command)."""

    def __init__(self, spec, model: str, spans: list[tuple[int, int]], link_ms: float | None,
                 progress: Callable[..., None]) -> None:
        self.spec, self.model, self.spans, self.link_ms, self.progress = spec, model, spans, link_ms, progress
        self._cm: Any = None

    def __enter__(self) -> tuple[list[str], Callable[[list[str]], subprocess.CompletedProcess]]:
        if self.link_ms is None:
            self._cm = LocalSwarm(model_arg(self.spec), self.spans, announce_period_s=2.0, progress=self.progress)
            swarm = self._cm.__enter__()
            return swarm.peers, _run_here
        from llmswarm.bench.netbed import NetBed, available, start_swarm

        why = available()
        if why is not None:
            raise NodeError(f"--link-ms needs the WAN test bed: {why}")
        names = {f"s{i}": span for i, span in enumerate(self.spans)}
        self._cm = NetBed({n: self.link_ms for n in ["boot", "client", *names]})
        bed = self._cm.__enter__()
        self.progress("starting the swarm in the WAN bed", 0, None)
        swarm = start_swarm(bed, model_arg(self.spec), names)
        return swarm.peers, lambda cmd: bed.run("client", cmd, timeout_s=CHAT_TIMEOUT_S)

    def __exit__(self, *exc: object) -> None:
        self._cm.__exit__(*exc)
