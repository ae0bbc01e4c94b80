"""`llmswarm chat`, one loop for both ways of running the blocks: every block in this process
(`--local`, the reference) or a chain of servers found in the swarm.

The CLI hands over its options and a `ChatEvents` object; everything a person sees goes through
those events (text pieces, finished answers, notes, the route), and the next user message comes from
`events.ask()`. Runs in one trio thread: the host, the directory, and the generation loop (whose
embedding and head run inline: nothing else on this loop needs to run while they compute, and a
second thread would only add a hand-off and GIL contention to every token).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol

import torch
import trio
from llmswarm.models.chat import ChatTurn, Conversation, TurnResult
from llmswarm.models.errors import LengthError
from llmswarm.models.generate import GenerationResult, Sampler, Sampling, Steps
from llmswarm.models.local import ClientModel, LocalChain, load_client_model
from llmswarm.models.registry import DEFAULT_DRAFT_TOKENS, resolve
from llmswarm.models.span import load_span, parse_dtype
from llmswarm.models.speculative import Drafter, draft_dtype, load_drafter
from llmswarm.node import config
from llmswarm.node.client.checked_turn import checked_turn
from llmswarm.node.client.observed import Observed
from llmswarm.node.client.reputation import Reputation
from llmswarm.node.client.route import make_replan, plan_route, route_lines, wire_dtype
from llmswarm.node.client.session import open_session
from llmswarm.node.client.verify import Verifier, parse_verify_rate
from llmswarm.node.discovery.directory import open_directory
from llmswarm.node.discovery.swarm_view import require_peers
from llmswarm.node.errors import UsageError
from llmswarm.node.host import ephemeral_host, open_host, quiet_libp2p_logging

StepFn = Callable[[torch.Tensor, int], Awaitable[torch.Tensor]]


@dataclass
class ChatOptions:
    model: str = config.DEFAULT_MODEL
    prompt: str | None = None  # answer this once; None: ask for messages until the end of input
    local: bool = False
    max_new_tokens: int = config.DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    dtype: str | None = None  # None or "auto": float32 on CPU, bfloat16 on GPUs that have it, else float16
    device: str = "cpu"  # a concrete device (models/device.py resolves "auto")
    max_length: int = config.DEFAULT_SESSION_LENGTH
    system: str | None = None
    peers: list[str] = field(default_factory=list)
    show_route: bool = False
    solver: str = config.DEFAULT_SOLVER
    prefer: str = config.DEFAULT_PREFER
    identity: str | None = None
    step_timeout: float = config.STEP_TIMEOUT_S
    coverage_wait: float = config.COVERAGE_WAIT_S  # seconds to wait for the swarm to cover every block
    relay: bool = True
    direct: bool = config.USE_DIRECT  # steps over a server's TLS data plane when offered (node/dataplane.py)
    listen_host: str = config.DEFAULT_LISTEN_HOST  # where the client's host listens
    wire_dtype: str | None = None
    exact_weights: bool = False  # route only through servers with full-precision weights
    draft: str | None = None  # a small model with the same tokenizer: speculative decoding (models/speculative.py)
    draft_tokens: int = DEFAULT_DRAFT_TOKENS  # the most draft tokens per step
    draft_dtype: str | None = None  # None or "auto": the model's dtype
    verify_rate: str | float | None = None  # share of steps that end in a check (node/client/verify.py); None: default


class ChatEvents(Protocol):
    """What the CLI is told while a chat runs (it renders; we never print)."""

    def progress(self, task: str, done: float, total: float | None) -> None: ...
    def ask(self) -> str | None: ...  # the next user message; None at the end of input (blocking)
    def route(self, lines: list[str]) -> None: ...
    def text(self, piece: str) -> None: ...
    def done(self, result: TurnResult) -> None: ...
    def note(self, message: str) -> None: ...


async def drive(steps: Steps, step: StepFn) -> GenerationResult:
    """Drive the sans-IO generation loop with an async block runner."""
    try:
        hidden, position = next(steps)
        while True:
            hidden, position = steps.send(await step(hidden, position))
    except StopIteration as done:
        return done.value


def run_chat(opts: ChatOptions, events: ChatEvents) -> None:
    """`llmswarm chat`: load the client's parts (all blocks too with --local), then converse."""
    if not opts.local:
        require_peers(opts.peers)
        wire_dtype(opts.wire_dtype)  # fail before loading anything
        parse_verify_rate(opts.verify_rate)
    spec = resolve(opts.model)
    dtype = parse_dtype(opts.dtype, opts.device)
    model = load_client_model(spec, dtype, opts.device, events.progress, with_blocks=opts.local)
    drafter = None
    if opts.draft:
        drafter = load_drafter(opts.draft, model, opts.max_length, opts.draft_tokens, events.progress,
                               draft_dtype(opts.draft_dtype, opts.device))
    if opts.local:
        span = load_span(model.ckpt, 0, model.cfg.num_blocks, dtype, opts.device, events.progress)
        chain = LocalChain([span], opts.max_length)

        async def local_step(hidden: torch.Tensor, position: int) -> torch.Tensor:
            return chain(hidden, position)

        trio.run(converse, opts, model, local_step, events, drafter)
    else:
        trio.run(_swarm_chat, opts, model, events, drafter)


async def _swarm_chat(opts: ChatOptions, model: ClientModel, events: ChatEvents, drafter: Drafter | None) -> None:
    quiet_libp2p_logging()
    # A client needs no stable peer id unless the user asks for one (--identity FILE).
    listen = opts.listen_host  # 0.0.0.0: a server behind NAT can dial us back (hole punching)
    host_cm = open_host(opts.identity, listen_host=listen) if opts.identity else ephemeral_host(listen_host=listen)
    observed = Observed(Reputation.load())  # what this client measured and checked, kept across runs
    rate = parse_verify_rate(opts.verify_rate)
    if drafter is not None and rate > 0:
        # A checked answer is generated one token per step (node/client/checked_turn.py); checking
        # speculative steps is not built yet, so a draft turns the default checks off (README: Trust).
        if opts.verify_rate is not None:
            raise UsageError("--draft and --verify-rate cannot be combined yet: drop one of them")
        rate = 0.0
    async with host_cm as host, open_directory(host, opts.peers, [model.spec.name], gossip=False) as d:
        host.use_direct = opts.direct
        result, names = await plan_route(host, d, model, opts.solver, opts.prefer, opts.max_length,
                                         coverage_wait_s=opts.coverage_wait, exact_weights=opts.exact_weights,
                                         relay=opts.relay, observed=observed)
        if opts.show_route:
            events.route(route_lines(result, names))
        replan = make_replan(host, d, model, opts.solver, opts.prefer, opts.max_length, opts.exact_weights,
                             opts.relay, observed=observed)
        try:
            async with open_session(host, result.chosen.chain, model.spec.name, model.cfg.hidden_size,
                                    opts.max_length, model.dtype, replan=replan, notify=events.note,
                                    step_timeout_s=opts.step_timeout, relay=opts.relay,
                                    wire_dtype=wire_dtype(opts.wire_dtype)) as session:
                session.observer = observed
                if opts.show_route:
                    paths = Counter(s.stream.path for s in session.spans)
                    direct = len(session.spans) - paths.pop("libp2p", 0)
                    how = ", ".join(f"{n} over {path}" for path, n in sorted(paths.items()))
                    events.route([f"streams: {direct} of {len(session.spans)} on the data plane"
                                  + (f" ({how})" if how else "") + f", {len(session.spans) - direct} on libp2p"])
                # with a draft, the draft works ahead while each step crosses the swarm
                step: StepFn = session.step if drafter is None else partial(session.step,
                                                                             while_waiting=drafter.work_ahead)
                async with trio.open_nursery() as checks:  # output checks run here, beside the answer
                    verifier = Verifier(host, d, model, session, observed, rate, opts.max_length, opts.solver,
                                        opts.prefer, events.note, opts.relay, checks,
                                        asked=opts.verify_rate is not None) if rate > 0 else None
                    try:
                        await converse(opts, model, step, events, drafter, verifier)
                    finally:
                        if verifier is not None:
                            await verifier.aclose()
        finally:
            observed.reputation.save()


async def converse(opts: ChatOptions, model: ClientModel, step: StepFn, events: ChatEvents,
                   drafter: Drafter | None = None, verifier: Verifier | None = None) -> None:
    """The chat loop: one turn per user message (or just `opts.prompt`), however the blocks run. With a
    `drafter`, each step verifies the tokens it proposes (speculative decoding); with a `verifier`, each
    answer's outputs are checked and its text shown once checked."""
    sampler = Sampler(Sampling(opts.temperature, opts.top_p, opts.seed))
    conv = Conversation(model.tokenizer, opts.system)
    while (text := await _next_message(opts, events)) is not None:
        try:
            turn = ChatTurn(model, conv, text, opts.max_new_tokens, sampler, events.text, max_length=opts.max_length,
                            drafter=drafter)
        except LengthError as e:
            if opts.prompt is not None:
                raise
            events.note(str(e))  # interactive: the person can send a shorter message
            continue
        if turn.truncated:
            events.note(f"the answer may stop early: the conversation is {len(turn.prompt)} tokens and "
                        f"--max-length is {opts.max_length}; pass a larger --max-length for longer answers")
        if verifier is None:
            events.done(turn.finish(await drive(turn.steps, step)))
        else:
            room = min(opts.max_new_tokens, opts.max_length - len(turn.prompt))
            events.done(turn.finish(await checked_turn(turn, model, sampler, room, verifier, events.text)))
        if opts.prompt is not None:
            return


async def _next_message(opts: ChatOptions, events: ChatEvents) -> str | None:
    if opts.prompt is not None:
        return opts.prompt
    while True:
        text = await trio.to_thread.run_sync(events.ask, abandon_on_cancel=True)
        if text is None or text.strip():
            return text
