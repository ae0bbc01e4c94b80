"""One swarm session per HTTP request, all sharing one host and one directory.

`SwarmBackend.complete()` runs a request the way `chat` runs a message: the prompt (the model's chat
template for chat requests), a route from the solver, a session on every server of it (relay and
failover as in node/client/session.py), the same sans-IO generation loop, and the session closed on
every exit, cancellation included (a client that hangs up frees the servers' cache at once).
Requests run concurrently on one trio loop; their LM heads run as one batched call per round
(node/client/batcher.py), which also keeps their steps in phase so the servers batch them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, nullcontext
from dataclasses import dataclass, replace
from typing import Any

import torch
import trio
from llmswarm.models.batched_head import HeadApplied
from llmswarm.models.chat import ChatTurn, Conversation
from llmswarm.models.errors import LengthError
from llmswarm.models.generate import GenerationResult, Sampler, Sampling
from llmswarm.models.local import ClientModel
from llmswarm.models.registry import DEFAULT_DRAFT_TOKENS
from llmswarm.models.speculative import Drafter
from llmswarm.node import config
from llmswarm.node.api.protocol import ApiError, CompletionRequest, StopText, Usage
from llmswarm.node.client.batcher import HeadBatcher
from llmswarm.node.client.route import make_replan, plan_route
from llmswarm.node.client.session import open_session
from llmswarm.node.discovery.directory import Directory
from llmswarm.node.errors import NodeError
from llmswarm.node.host import Host
from llmswarm.routing import Hop, NoRouteError, RoutingError

Emit = Callable[[str], Awaitable[None]]
StepFn = Callable[[torch.Tensor, int], Awaitable[torch.Tensor]]


@dataclass
class BackendOptions:
    max_length: int = config.DEFAULT_SESSION_LENGTH  # most tokens one request may hold (prompt + answer)
    max_concurrent: int = config.API_MAX_CONCURRENT
    solver: str = config.DEFAULT_SOLVER
    prefer: str = config.DEFAULT_PREFER
    step_timeout: float = config.STEP_TIMEOUT_S
    relay: bool = True
    exact_weights: bool = False
    batch_heads: bool = True  # the heads of concurrent requests as one call per round (node/client/batcher.py)
    draft: str | None = None  # speculative decoding: the draft model (every request gets its own cache)
    draft_tokens: int = DEFAULT_DRAFT_TOKENS
    draft_dtype: str | None = None  # None or "auto": the model's dtype


@dataclass
class Answer:
    text: str
    finish_reason: str  # "stop" (a stop token or stop string) or "length"
    usage: Usage


class PromptConversation(Conversation):
    """A conversation whose whole prompt comes with the request (an API request carries its history)."""

    def __init__(self, tokenizer: Any, ids: list[int]) -> None:
        super().__init__(tokenizer)
        self.ids = ids

    def prompt_ids(self, user_text: str) -> list[int]:
        self.messages.append({"role": "user", "content": user_text})
        return self.ids


class SwarmBackend:
    def __init__(self, host: Host, directory: Directory, model: ClientModel, opts: BackendOptions,
                 rtts: Callable[[], dict[str, float]] = dict, drafter: Drafter | None = None) -> None:
        """`rtts()`: round trips to servers measured lately (for all requests, by serve.py's SwarmWatch):
        a request pings only the servers missing there, instead of every server of the model, which
        under load (16 requests starting at once, on busy servers) ran past the ping timeout."""
        self.host, self.directory, self.model, self.opts = host, directory, model, opts
        self.rtts = rtts
        # with a draft, each request forks it (its own cache) and runs its head itself: a step checks
        # K + 1 positions, which the one-row head batching does not cover
        self.drafter = drafter
        self.drafted = self.accepted = 0
        self.active = 0  # requests holding a slot
        self.batcher = HeadBatcher(model.parts, enabled=opts.batch_heads)  # `serve` runs in serve.py's nursery
        self._head_applied = replace(model, parts=HeadApplied(model.parts))  # generations get logits
        self._route_lock = trio.Lock()
        self._route: tuple[float, int, list[Hop]] | None = None  # (solved at, for length, chain)

    def stats(self) -> dict[str, Any]:
        """Requests in flight and how their heads batched (`GET /v1/swarm`'s "api")."""
        stats = {"requests": self.active, **self.batcher.stats.as_dict()}
        if self.drafter is not None:
            stats["draft"] = {"model": self.drafter.name, "drafted": self.drafted, "accepted": self.accepted,
                              "acceptance_rate": round(self.accepted / self.drafted, 4) if self.drafted else 0.0}
        return stats

    @property
    def model_names(self) -> set[str]:
        return {self.model.spec.name}

    def prompt_ids(self, req: CompletionRequest) -> list[int]:
        """The request's prompt as token ids; 400 when it leaves no room for an answer."""
        tok = self.model.tokenizer
        if not req.chat:
            ids = list(tok(req.prompt)["input_ids"])
        elif getattr(tok, "chat_template", None):
            out = tok.apply_chat_template(req.messages, add_generation_prompt=True, tokenize=True)
            ids = list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "input_ids") else out)
        else:  # a base model: plain continuation, as `chat` does
            ids = list(tok("\n".join(m["content"] for m in req.messages))["input_ids"])
        if len(ids) >= self.opts.max_length:
            raise ApiError(400, f"the prompt is {len(ids)} tokens and this endpoint's session limit is "
                           f"{self.opts.max_length}: shorten it (or restart `llmswarm api` with a larger "
                           "--max-length)", "messages" if req.chat else "prompt", "context_length_exceeded")
        return ids

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """One of --max-concurrent places, held for the request's life; 429 when none is free."""
        if self.active >= self.opts.max_concurrent:
            raise ApiError(429, f"{self.active} requests are in flight, the most this endpoint takes "
                           f"(--max-concurrent {self.opts.max_concurrent}): retry shortly",
                           code="too_many_requests", retry_after_s=1)
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1

    async def route(self, length: int) -> list[Hop]:
        """A chain for a session of `length` tokens: the last one solved, if it is recent and was
        solved for at least that many tokens, else a new one. One solve at a time: the solver runs on
        this loop (NSGA-II for CHAT_SOLVE_BUDGET_S), and 16 requests solving at once would stall
        every stream for seconds; requests that arrive together share one solve."""
        m, o = self.model, self.opts
        async with self._route_lock:
            if self._route is not None:
                solved_at, solved_for, chain = self._route
                if trio.current_time() - solved_at < config.API_ROUTE_REUSE_S and solved_for >= length:
                    return chain
            try:
                result, _ = await plan_route(self.host, self.directory, m, o.solver, o.prefer, length,
                                             coverage_wait_s=config.API_COVERAGE_WAIT_S,
                                             exact_weights=o.exact_weights, known_rtts=self.rtts())
            except NoRouteError as e:
                raise ApiError(503, f"no route: {e}", code="no_route",
                               retry_after_s=config.API_RETRY_AFTER_S) from None
            self._route = (trio.current_time(), length, result.chosen.chain)
            return result.chosen.chain

    @asynccontextmanager
    async def session(self, length: int) -> AsyncIterator[StepFn]:
        """A route and an open session holding `length` tokens: 503 while no route covers the model.
        A server of the chain that refuses or fails is replaced as in `chat` (its own re-plan)."""
        m, o = self.model, self.opts
        chain = await self.route(length)
        replan = make_replan(self.host, self.directory, m, o.solver, o.prefer, length, o.exact_weights)
        async with open_session(self.host, chain, m.spec.name, m.cfg.hidden_size, length, m.dtype,
                                replan=replan, step_timeout_s=o.step_timeout, relay=o.relay) as session:
            yield session.step

    async def complete(self, req: CompletionRequest, ids: list[int], emit: Emit) -> Answer:
        """Generate the answer to `req` through the swarm, handing each piece of text to `emit`."""
        length = min(self.opts.max_length, len(ids) + req.max_tokens)
        try:
            async with self.session(length) as step:
                return await self.generate(req, ids, step, emit, length)
        except (NodeError, RoutingError) as e:
            raise ApiError(503, f"the swarm failed while answering: {e}", code="swarm_error",
                           retry_after_s=config.API_RETRY_AFTER_S) from None

    async def generate(self, req: CompletionRequest, ids: list[int], step: StepFn, emit: Emit,
                       length: int) -> Answer:
        """The generation loop of one request, through any block runner (`step`)."""
        stop = StopText(req.stop)
        pieces: list[str] = []
        sampler = Sampler(Sampling(req.temperature, req.top_p, req.seed))
        conv = PromptConversation(self.model.tokenizer, ids)
        drafter = self.drafter.fork(length) if self.drafter is not None else None
        try:
            turn = ChatTurn(self._head_applied if drafter is None else self.model, conv, "", req.max_tokens,
                            sampler, pieces.append, max_length=length, drafter=drafter)
        except LengthError as e:
            raise ApiError(400, str(e), "max_tokens", "context_length_exceeded") from None
        steps, shown = turn.steps, []
        result: GenerationResult | None = None
        generated = 0
        hidden, position = next(steps)
        with self.batcher.generation() if drafter is None else nullcontext() as owner:
            while result is None and not stop.stopped:
                if drafter is None:
                    out = await step(hidden, position)
                    out = await self.batcher.head(owner, out)  # in one call with this round's other requests
                else:  # the generation runs the head on every checked position; drafts ahead meanwhile
                    out = await step(hidden, position, drafter.work_ahead)  # type: ignore[call-arg]
                try:
                    hidden, position = steps.send(out)
                except StopIteration as done:
                    result = done.value
                generated += len(pieces)  # one piece (maybe empty) per generated token
                text = stop.feed("".join(pieces))
                pieces.clear()
                if result is not None:
                    text += stop.flush()
                if text:
                    shown.append(text)
                    await emit(text)
        steps.close()
        if drafter is not None:  # counted by the drafter: a stop string ends the loop before any result
            self.drafted += drafter.drafted
            self.accepted += drafter.accepted
        finish = "stop" if stop.stopped or (result is not None and result.stopped) else "length"
        return Answer("".join(shown), finish, Usage(len(ids), generated))
