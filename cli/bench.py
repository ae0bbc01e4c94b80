"""`llmswarm bench swarm`: the swarm against a local run of the same model, in one run.
`llmswarm bench server`: one server's aggregate decode tokens/s with 1, 4, 16 concurrent sessions.
`llmswarm bench api`: N concurrent streaming requests through `llmswarm api` (bench/api_load.py).
`llmswarm bench hop`: one STEP/OUTPUT round trip over libp2p, the data plane and bare TCP (bench/hop.py)."""

from __future__ import annotations

import typer

from . import output, params


def bench_swarm(
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Model name or folder."),
    servers: int = typer.Option(3, "--servers", "-s", min=1, max=16, help="Server processes."),
    rounds: int = typer.Option(5, "--rounds", "-r", min=1, help="Alternating local/swarm rounds."),
    new_tokens: int = typer.Option(64, "--tokens", "-t", min=2, help="Tokens generated per round."),
    dtype: str = typer.Option("auto", "--dtype", help="auto | float32 | bfloat16 | float16"),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N: servers and local reference."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
    draft: str = typer.Option(None, "--draft",
                              help="Speculative decoding: draft models, comma-separated (a name, a folder, or "
                                   "`random`: a random-init model with the target's tokenizer), each measured "
                                   "against plain greedy, locally and through the swarm, in one run."),
    draft_tokens: int = typer.Option(None, "--draft-tokens", min=1, help="Most draft tokens per step."),
    draft_dtype: str = typer.Option(None, "--draft-dtype", help="The draft's dtype (see `chat --draft-dtype`)."),
    link_ms: float = typer.Option(None, "--link-ms", min=0.0, max=1000.0,
                                  help="Run the swarm in the WAN test bed (network namespaces, root), every packet "
                                       "delayed this many ms one way; reports per-token time against the link floor."),
) -> None:
    """Decode tokens/s through a local N-server swarm vs the same model in-process (medians)."""
    if draft is not None or link_ms is not None:
        _bench_speculative(model, servers, rounds, new_tokens, draft, draft_tokens, link_ms, json_out, draft_dtype)
        return
    from llmswarm.bench.speed import bench_swarm as run

    with output.progress(not json_out) as report:
        r = run(model, servers, rounds, new_tokens, dtype, report, device=device)
    if json_out:
        output.print_json(r)
        return
    from rich.table import Table

    t = Table(title=f"{r['model']} {r['dtype']} on {r['device']}, {r['servers']} servers {' '.join(r['spans'])}, "
                    f"{r['new_tokens']} tokens x {r['rounds']} rounds (medians)")
    for col in ("", "tokens/s", "ms/step", "first token ms"):
        t.add_column(col, justify="right")
    for k in ("local", "swarm", "swarm_libp2p", "swarm_no_relay"):
        label = "swarm, no data plane" if k == "swarm_libp2p" else k.replace("_", " ")
        t.add_row(label, f"{r[k]['tokens_per_s']:.2f}", f"{r[k]['step_ms']:.2f}",
                  f"{r[k]['ttft_ms']:.1f}")
    output.console.print(t)
    output.console.print(f"swarm / local: [bold]{r['ratio']:.3f}[/bold] (no data plane {r['ratio_libp2p']:.3f}, "
                         f"no relay {r['ratio_no_relay']:.3f})   "
                         f"added per hop per step: [bold]{r['added_ms_per_hop_per_step']:.2f} ms[/bold] "
                         f"(no data plane {r['added_ms_per_hop_per_step_libp2p']:.2f} ms, "
                         f"no relay {r['added_ms_per_hop_per_step_no_relay']:.2f} ms)   "
                         f"streams on the data plane: {r['direct_streams']['swarm']} of {r['servers']}   "
                         f"relayed pairs: {r['relayed_pairs']}   token-identical: "
                         f"{r['token_identical']}   join -> announced: "
                         + ", ".join(f"{s:.1f} s" for s in r["seconds_join_to_announced"])
                         + " (process start -> announced: "
                         + ", ".join(f"{s:.1f} s" for s in r["seconds_process_start_to_announced"]) + ")")
    for name, w in r["wire_dtype"].items():
        output.console.print(f"--wire-dtype {name}: last hop's output differs by at most {w['max_abs_diff']:.3g} "
                             f"(values up to {w['max_abs']:.3g}); greedy tokens identical: {w['token_identical']} "
                             f"({w['tokens_agreeing_before_first_difference']} agree before the first difference)")


def _bench_speculative(model: str, servers: int, rounds: int, new_tokens: int, draft: str | None,
                       draft_tokens: int | None, link_ms: float | None, json_out: bool,
                       draft_dtype: str | None = None) -> None:
    from llmswarm.bench.speculative import bench_speculative

    drafts = [d.strip() for d in draft.split(",") if d.strip()] if draft else [model]
    with output.progress(not json_out) as report:
        r = bench_speculative(model, drafts, servers, rounds, new_tokens, link_ms, draft_tokens, report,
                              draft_dtype=draft_dtype)
    if json_out:
        output.print_json(r)
        return
    from rich.table import Table

    where = f"links {r['link_ms_one_way']:g} ms one way (WAN bed)" if link_ms is not None else "loopback"
    t = Table(title=f"{r['model']}, {r['servers']} servers {' '.join(r['spans'])}, {where}, {r['new_tokens']} tokens "
                    f"x {r['rounds']} rounds (medians), load {r['load_avg_1m']:.1f}")
    for col in ("", "tokens/s", "ms/token", "tokens/step", "accepted", "identical to local"):
        t.add_column(col, justify="right")
    for k, row in r["rows"].items():
        acc = f"{row['acceptance_rate']:.0%}" if "acceptance_rate" in row else ""
        t.add_row(k, f"{row['tokens_per_s']:.2f}", f"{row['ms_per_token'] or 0:.1f}", f"{row['tokens_per_step']:.2f}",
                  acc, str(row["token_identical"]))
    output.console.print(t)
    if link_ms is not None:
        output.console.print(f"link floor: {r['link_floor_ms_per_step']:.0f} ms per swarm step "
                             f"({r['servers'] + 1} links with relay)")
    output.console.print("   ".join(f"{k}: [bold]{v:.3f}[/bold]" for k, v in r["ratios"].items()))


def bench_server(
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Model name or folder."),
    sessions: str = typer.Option("1,4,16", "--sessions", "-n", help="Concurrent session counts, comma-separated."),
    tokens: int = typer.Option(32, "--tokens", "-t", min=1, max=4000, help="Decode steps per session."),
    seconds: float = typer.Option(None, "--seconds", min=0.1, max=600,
                                  help="Decode for this long per session count instead of --tokens steps."),
    prompt_tokens: int = typer.Option(32, "--prompt-tokens", min=1, max=4000, help="Prefill length per session."),
    dtype: str = typer.Option("auto", "--dtype", help="auto | float32 | bfloat16 | float16"),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N for the server."),
    quant: str = typer.Option("none", "--quant", help="none | int8 | nf4 for the server's weights."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Aggregate decode tokens/s of ONE server holding the whole model, with N concurrent sessions."""
    from llmswarm.bench.speed import bench_server as run

    try:
        counts = [int(x) for x in sessions.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter("--sessions takes comma-separated integers, e.g. 1,4,16") from None
    if not counts or min(counts) < 1 or max(counts) > 256:
        raise typer.BadParameter("--sessions takes counts from 1 to 256, e.g. 1,4,16")
    with output.progress(not json_out) as report:
        r = run(model, counts, None if seconds else tokens, seconds, prompt_tokens, dtype, progress=report,
                device=device, quant=quant)
    if json_out:
        output.print_json(r)
        return
    from rich.table import Table

    length = f"{r['seconds']:g} s" if r["seconds"] else f"{r['tokens']} steps"
    t = Table(title=f"one server, {r['model']} {r['dtype']} {r['quant']} on {r['device']} "
                    f"(all {r['blocks']} blocks): prefill "
                    f"{r['prompt_tokens']} tokens, then decode {length} per session")
    for col in ("sessions", "tokens/s (all)", "tokens/s per session", "step ms mean", "median", "p90",
                f"speedup vs {r['speedup_baseline_sessions']}"):
        t.add_column(col, justify="right")
    for row in r["runs"]:
        t.add_row(str(row["sessions"]), f"{row['aggregate_tokens_per_s']:.1f}",
                  f"{row['per_session_tokens_per_s']:.2f}", f"{row['step_ms_mean']:.1f}",
                  f"{row['step_ms_median']:.1f}", f"{row['step_ms_p90']:.1f}", f"{row['speedup']:.2f}x")
    output.console.print(t)
    same = max(row["max_abs_diff_vs_single"] for row in r["runs"])
    output.console.print(f"server's own in-process decode at start-up: {r['server_in_process_tokens_per_s']:.1f} "
                         f"tokens/s (one session, no network)   outputs vs a lone session: max |diff| {same:.2e}   "
                         f"bench {r['bench_seconds']:.1f} s")


def bench_quant(
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Model name or folder."),
    modes: str = typer.Option("none,int8", "--modes", help="Quantisation modes, the first is the reference."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N"),
    dtype: str = typer.Option("auto", "--dtype", help="auto | float32 | bfloat16 | float16"),
    new_tokens: int = typer.Option(32, "--tokens", "-t", min=2, max=1000, help="Greedy tokens per prompt."),
    rounds: int = typer.Option(3, "--rounds", "-r", min=1, help="Decode rounds for tokens/s (median)."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Memory per block, decode tokens/s and greedy agreement with full precision, per quantisation mode."""
    from llmswarm.bench.quant import bench_quant as run

    mode_list = [m.strip() for m in modes.split(",") if m.strip()]
    with output.progress(not json_out) as report:
        r = run(model, mode_list, device, dtype, new_tokens, rounds, progress=report)
    if json_out:
        output.print_json(r)
        return
    from rich.table import Table

    t = Table(title=f"{r['model']} {r['dtype']} on {r['device']}, {r['blocks']} blocks: greedy agreement over "
                    f"{r['prompts']} prompts x {r['new_tokens']} tokens (teacher-forced) with {r['reference']}")
    for col in ("quant", "MiB per block", "vs ref", "tokens/s", "vs ref ", "agreement"):
        t.add_column(col, justify="right")
    for row in r["modes"]:
        t.add_row(row["quant"], f"{row['bytes_per_block'] / 2**20:.2f}", f"{row['bytes_vs_reference']:.3f}",
                  f"{row['tokens_per_s']:.1f}", f"{row['speed_vs_reference']:.2f}", f"{row['agreement']:.1%}")
    output.console.print(t)


def bench_api(
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Model name or folder."),
    servers: int = typer.Option(3, "--servers", "-s", min=1, max=16, help="Server processes."),
    concurrency: str = typer.Option("1,4,16", "--concurrent", "-c", help="Numbers of requests at once."),
    new_tokens: int = typer.Option(32, "--tokens", "-t", min=2, help="max_tokens of each request."),
    compare: bool = typer.Option(False, "--compare", help="Also run each N on an API process without head "
                                                          "batching (--no-batch-heads), in turn."),
    draft: str | None = typer.Option(None, "--draft", help="Also run each N on an API process with this draft "
                                                           "model (`api --draft`), in turn."),
    draft_tokens: int = params.draft_tokens_option(),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """N concurrent streaming requests through `llmswarm api` on a local swarm: aggregate tokens/s,
    time to first token, inter-token latency."""
    from llmswarm.bench.api_load import bench_api as run

    try:
        counts = [int(c) for c in concurrency.split(",") if c.strip()]
    except ValueError:
        raise typer.BadParameter(f"{concurrency!r} is not a list like 1,4,16", param_hint="--concurrent") from None
    if not counts or min(counts) < 1:
        raise typer.BadParameter("give at least one count, each 1 or more", param_hint="--concurrent")
    with output.progress(not json_out) as report:
        r = run(model, servers, counts, new_tokens, compare, draft, draft_tokens, report)
    if json_out:
        output.print_json(r)
        return
    from rich.table import Table

    t = Table(title=f"{r['model']} through `llmswarm api`, {r['servers']} servers {' '.join(r['spans'])}, "
                    f"{r['tokens']} tokens per request")
    for col in ("api", "requests", "decode tokens/s", "speedup", "vs other", "per request", "TTFT p50 ms",
                "TTFT p90 ms", "ITL p50 ms", "ITL p90 ms", "head batch", "API CPU ms/token"):
        t.add_column(col, justify="right")
    for row in r["rows"]:
        vs = "-"
        if "vs_unbatched" in row:
            vs = f"{row['vs_unbatched']:.2f}x unbatched"
        elif "vs_plain" in row:
            vs = f"{row['vs_plain']:.2f}x plain, {row.get('acceptance_rate', 0):.0%} drafts stood"
        t.add_row(row["api"], str(row["concurrent"]), f"{row['decode_tokens_per_s']:.2f}", f"{row['speedup']:.2f}x",
                  vs, f"{row['per_request_tokens_per_s']:.2f}", f"{row['ttft_p50_ms']:.0f}",
                  f"{row['ttft_p90_ms']:.0f}", f"{row['itl_p50_ms']:.1f}", f"{row['itl_p90_ms']:.1f}",
                  f"{row['mean_head_batch']:.2f}", f"{row['api_cpu_ms_per_token']:.2f}")
    output.console.print(t)
    output.console.print(f"one `chat` through the same swarm: {r['chat_tokens_per_s']:.2f} tokens/s; API overhead "
                         f"per token at 1 request: {r['api_overhead_ms_per_token']} ms")


def bench_hop(
    round_trips: int = typer.Option(400, "--round-trips", "-n", min=10, max=100000, help="Round trips per round."),
    rounds: int = typer.Option(3, "--rounds", "-r", min=1, max=100, help="Alternating rounds (median)."),
    hidden: int = typer.Option(576, "--hidden", min=1, max=65536, help="Hidden size (float32 values per STEP)."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """One STEP/OUTPUT round trip over libp2p, the data plane (TLS; Unix socket) and bare TCP, no model."""
    from llmswarm.bench.hop import bench_hop as run

    with output.progress(not json_out) as report:
        r = run(round_trips, rounds, hidden, progress=report)
    if json_out:
        output.print_json(r)
        return
    from rich.table import Table

    t = Table(title=f"STEP/OUTPUT round trips, {r['body_bytes']} bytes each way, both ends in one process "
                    f"({r['round_trips']} x {r['rounds']} rounds, medians)")
    for col in ("", "wall ms", "CPU ms"):
        t.add_column(col, justify="right")
    for k, label in (("libp2p", "libp2p (Noise + yamux)"), ("data_plane", "data plane (TLS 1.3)"),
                     ("data_plane_unix", "data plane, one host (Unix socket)"), ("tcp", "bare TCP (reference)")):
        t.add_row(label, f"{r[k]['wall_ms']:.3f}", f"{r[k]['cpu_ms']:.3f}")
    output.console.print(t)


def bench_verify(
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Model name or folder."),
    rounds: int = typer.Option(3, "--rounds", "-r", min=1, help="Alternating off/default/all rounds."),
    new_tokens: int = typer.Option(64, "--tokens", "-t", min=2, help="Tokens generated per answer."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Decode tokens/s with output checks off, at the default --verify-rate and at every step (one run)."""
    from llmswarm.bench.verify import bench_verify as run

    with output.progress(not json_out) as report:
        r = run(model, rounds, new_tokens, report)
    if json_out:
        output.print_json(r)
        return
    from rich.table import Table

    t = Table(title=f"{r['model']}, {r['servers']} servers {' '.join(r['spans'])} (two chains), chain "
                    f"{' > '.join(r['chain'])}, {r['new_tokens']} tokens x {r['rounds']} rounds (medians)")
    for col in ("checks", "tokens/s", "vs off", "checks per answer", "worst error seen"):
        t.add_column(col, justify="right")
    for mode, label in (("off", "off"), ("default", f"default (rate {r['default_rate']:g})"), ("all", "all")):
        c = r["checks"][mode]
        ratio = r["tokens_per_s"][mode] / r["tokens_per_s"]["off"]
        t.add_row(label, f"{r['tokens_per_s'][mode]:.2f}", f"{ratio:.3f}", "-" if c is None else str(c["checks"]),
                  "-" if c is None else f"{c['worst_error']:.2e}")
    output.console.print(t)
    output.console.print(f"token-identical: {r['token_identical']}   bench {r['bench_seconds']:.0f} s")
    for note in r["notes"]:
        output.warn(note)
