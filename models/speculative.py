"""Speculative decoding, sans-IO: a small draft model on the client proposes K tokens, one run of the
target's blocks (one swarm round trip) checks them all.

`speculative_steps()` is driven exactly like `generation_steps()` (models/generate.py): it yields
`(hidden, position)` for the target's blocks and is sent their output. Each step feeds the tokens the
target has not seen yet (the prompt, or the last token) plus K drafts at an explicit position; the
target's logits at those positions decide how many drafts stand (`verify`), and the next step is sent
at the end of the accepted prefix, so every cache (the servers', the draft's own) rewinds over the
rejected drafts by position.

`verify` is standard speculative sampling (Leviathan et al. 2023, Chen et al. 2023): draft token d
with draft probability q(d) is kept with probability min(1, p(d)/q(d)); the first one refused is
replaced by a sample of norm(max(0, p - q)); when all K stand, a bonus token is sampled from the
target's next distribution. The tokens come out distributed as the target alone would sample them.
Greedy is the limit: a draft stands when it is the target's argmax, and the correction is the argmax,
so the output is token-identical to decoding without a draft (up to float rounding that a K+1-token
forward may do differently from K+1 one-token forwards).

`AdaptiveK` picks K before each step (see its docstring for the rule).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .checkpoint import Progress, _noop
from .device import resolve_dtype
from .errors import ModelError
from .generate import GenerationResult, Sampler, Sampling, Steps
from .local import ClientModel, LocalChain, load_client_model, load_local_chain
from .registry import DEFAULT_DRAFT_TOKENS, DRAFT_PROBE_EVERY, MAX_DRAFT_TOKENS, resolve
from .threads import StepThreads, threads


class AdaptiveK:
    """How many tokens to draft next, from what the last steps measured.

    The rule: with a per-token acceptance rate a, K drafts give E(K) = 1 + a + ... + a^K tokens per
    step, and a step costs T(K) = t0 + t1 * (K + 1) + K * td, where t0 + t1 * n is the measured time
    of a round trip through the blocks feeding n tokens (link latency and the servers' compute: t0 is
    mostly the links, t1 the compute per token) and td the draft's time per token. Pick the K in
    0..k_max with the most tokens per second E(K) / T(K). a is counted over recent steps (accepted
    drafts over drafts tested, the first refusal included), every sum decaying by `decay` per step.
    After `probe_every` steps at K = 0 one step drafts a token, so a draft that starts to agree again
    is noticed. Until a decode step has been measured (a prompt's step is not: it is compute-bound),
    K = k_max while a >= 0.5, else 1. While every measured step fed as many tokens (t1 cannot be
    fitted), checking k_max + 1 tokens is taken to cost two one-token steps."""

    def __init__(self, k_max: int, decay: float = 0.8, probe_every: int = DRAFT_PROBE_EVERY,
                 prior_accept: float = 0.6, adapt: bool = True) -> None:
        self.k_max, self.decay, self.probe_every, self.adapt = k_max, decay, probe_every, adapt
        self._accepted, self._tested = prior_accept, 1.0  # a prior worth one tested draft
        self._fit = [0.0] * 5  # decayed sums of 1, n, n^2, t, n*t over steps (least squares t = t0 + t1 n)
        self._draft_s, self._drafts = 0.0, 0.0
        self._idle = 0  # steps in a row at K = 0
        self.last_k = 0  # the K chosen for the step in flight

    @property
    def acceptance(self) -> float:
        return self._accepted / self._tested if self._tested else 0.0

    def step_cost(self) -> tuple[float, float]:
        """(t0, t1): a round trip through the blocks as seconds at 0 tokens and per token fed."""
        w, sn, snn, st, snt = self._fit
        if w <= 0:
            return 0.0, 0.0
        mean_n, mean_t = sn / w, st / w
        var = snn / w - mean_n**2
        if var > 0.25:
            t1 = max(0.0, (snt / w - mean_n * mean_t) / var)
        else:  # every step fed as many tokens: assume checking k_max + 1 tokens costs two 1-token steps
            t1 = mean_t / (self.k_max + mean_n)
        return max(0.0, mean_t - t1 * mean_n), t1

    def choose(self, peek: bool = False) -> int:
        """K for the next step (`peek`: what it would be, without counting a step)."""
        k = self._choose(peek)
        if not peek:
            self.last_k = k
        return k

    def _choose(self, peek: bool) -> int:
        if not self.adapt:
            return self.k_max
        if self._fit[0] <= 0:  # no decode step measured yet: trust the draft as far as it was right
            return self.k_max if self.acceptance >= 0.5 else min(1, self.k_max)
        a = min(self.acceptance, 0.999)
        t0, t1 = self.step_cost()
        td = self._draft_s / self._drafts if self._drafts else 0.0
        best, best_rate = 0, 0.0
        for k in range(self.k_max + 1):
            rate = (1 - a ** (k + 1)) / (1 - a) / max(t0 + t1 * (k + 1) + k * td, 1e-9)
            if rate > best_rate * (1 + 1e-9):
                best, best_rate = k, rate
        if peek:
            return best
        if best == 0:
            self._idle += 1
            if self._idle > self.probe_every:
                self._idle = 0
                return min(1, self.k_max)
        else:
            self._idle = 0
        return best

    def observe(self, k: int, accepted: int, fed: int, step_s: float, draft_s: float) -> None:
        """After a step that fed `fed` tokens, `k` of them drafts, of which `accepted` stood."""
        d = self.decay
        if k > 0:
            self._accepted = d * self._accepted + accepted
            self._tested = d * self._tested + accepted + (1 if accepted < k else 0)
            self._draft_s, self._drafts = d * self._draft_s + draft_s, d * self._drafts + k
        if fed > self.k_max + 1:  # a prompt: compute-bound, it would pass for a slow link
            return
        f = self._fit
        for i, v in enumerate((1.0, fed, fed * fed, step_s, fed * step_s)):
            f[i] = d * f[i] + v


class Drafter:
    """The draft model on the client: embeddings, head and all blocks in-process, with its own cache.

    `held` is the token ids the draft's cache holds, in order; drafting first feeds whatever of the
    context it does not hold (at the first differing position: its cache rewinds there).

    Working ahead (greedy only): while the target checks a proposal (`work_ahead`, called by the
    session right after it sent the step), the draft guesses that every draft stands and that the
    bonus token is its own next pick, and drafts the following proposal. When the guess holds, the
    next `propose` starts from those tokens instead of computing them after the reply."""

    def __init__(self, name: str, parts: nn.Module, blocks: Callable[[torch.Tensor, int], torch.Tensor],
                 vocab_size: int, k_max: int, step_threads: StepThreads | None = None) -> None:
        self.name, self.parts, self.blocks = name, parts, blocks
        # CPU threads while drafting (models/threads.py): drafting is one-row steps, and on a machine
        # where one thread is as fast, the other cores stay free for the servers checking the last
        # proposal (on one machine) and for the client's own head
        self.step_threads = step_threads
        self.vocab_size = vocab_size  # the target's logits' width: the draft's are cut or padded to it
        self.k_max = k_max
        self.policy = AdaptiveK(k_max)  # kept across turns: the link and the draft do not change
        self.held: list[int] = []
        self.token_s = 0.0  # moving average of the draft's compute per token
        self.ahead_hits = 0  # proposals that started from tokens drafted while waiting
        self.forwards = 0  # draft-model forwards run (each gives one draft token's logits)
        self.forward_s = 0.0  # the seconds they took
        self.ahead_s = 0.0  # seconds spent working ahead (while the target checked a proposal)
        self.drafted = self.accepted = 0  # over every step checked so far, ended generations or not
        self._device = next(parts.parameters()).device
        self._proposed: list[int] | None = None  # context + drafts of the proposal being checked (greedy)
        self._ahead: tuple[list[int], list[int]] | None = None  # (the context guessed, drafts following it)
        # the most drafts the step after the one in flight can take if all of this one stands (None: no
        # bound): a generation that ends with this step (its token budget) is not drafted past
        self.ahead_room: int | None = None

    def fork(self, max_length: int) -> Drafter:
        """A drafter for another generation: the same weights, its own cache of `max_length` tokens
        (plus room for a proposal), and the K policy learned so far (the link and the draft are the
        same). An API serves each request with one (its requests decode at once)."""
        if not isinstance(self.blocks, LocalChain):
            raise TypeError("only a drafter over a LocalChain can be forked")
        blocks = LocalChain(self.blocks.spans, max_length + self.k_max + 1)
        twin = Drafter(self.name, self.parts, blocks, self.vocab_size, self.k_max, self.step_threads)
        twin.policy = copy.deepcopy(self.policy)
        twin.token_s = self.token_s
        return twin

    def _logits(self, ids: list[int], position: int) -> torch.Tensor:
        with threads(self.step_threads.for_rows(len(ids)) if self.step_threads else None):
            x = self.parts.embed(torch.tensor([ids], dtype=torch.long, device=self._device))
            logits = self.parts.head(self.blocks(x, position)[:, -1:])[0, -1].float()
        v = logits.shape[0]
        if v > self.vocab_size:
            return logits[: self.vocab_size]
        if v < self.vocab_size:
            return torch.cat([logits, logits.new_full((self.vocab_size - v,), float("-inf"))])
        return logits

    @torch.inference_mode()
    def _draft(self, context: list[int], k: int, sampler: Sampler,
               stop: Callable[[], bool] | None = None) -> tuple[list[int], list[torch.Tensor]]:
        """K tokens following `context` from the draft alone, and (sampling) the distributions drawn from;
        fewer (at least one) when `stop()` says so between two forwards."""
        started = time.perf_counter()
        common = 0
        for a, b in zip(self.held, context, strict=False):
            if a != b:
                break
            common += 1
        common = min(common, len(context) - 1)  # feed at least one token to get logits
        logits = self._logits(context[common:], common)
        self.held = list(context)
        drafts: list[int] = []
        dists: list[torch.Tensor] = []
        for j in range(k):
            if sampler.greedy:
                token = int(torch.argmax(logits))
            else:
                q = sampler.probs(logits)
                q = q / q.sum()
                token = sampler.draw(q)
                dists.append(q)
            drafts.append(token)
            if j == k - 1 or (stop is not None and stop()):
                break
            logits = self._logits([token], len(self.held))
            self.held.append(token)
        elapsed = time.perf_counter() - started
        self.forwards += len(drafts)
        self.forward_s += elapsed
        per_token = elapsed / max(len(drafts), 1)
        self.token_s = per_token if self.token_s == 0 else 0.7 * self.token_s + 0.3 * per_token
        return drafts, dists

    def propose(self, context: list[int], k: int, sampler: Sampler) -> tuple[list[int], list[torch.Tensor]]:
        """K draft tokens following `context`, and (when sampling) the distribution each was drawn from."""
        drafts: list[int] = []
        if self._ahead is not None and sampler.greedy and self._ahead[0] == context:
            drafts = self._ahead[1][:k]
            self.ahead_hits += bool(drafts)
        self._ahead = None
        dists: list[torch.Tensor] = []
        if len(drafts) < k:
            more, dists = self._draft(context + drafts, k - len(drafts), sampler)
            drafts += more
        self._proposed = context + drafts if sampler.greedy and k > 0 else None
        return drafts, dists

    def work_ahead(self, arrived: Callable[[], bool] | None = None) -> None:
        """While the target checks the last proposal: draft the next one on the guess that all of it
        stands, as many tokens as the next step will want. `arrived()` says whether the reply is
        here (a poll of its socket): drafting stops then, so a wrong guess delays the reply by one
        draft forward at most, and the guess is always worth trying (the first step's included, when
        nothing is known of the draft yet). Without it (a reply on libp2p), only a draft whose
        proposals usually stand works ahead: a wrong guess would delay the reply by all of it."""
        proposed, self._proposed = self._proposed, None
        if proposed is None:
            return
        k = self.policy.choose(peek=True)
        if self.ahead_room is not None:
            k = min(k, self.ahead_room)
        if k <= 0 or (arrived is None and self.policy.acceptance ** (self.policy.last_k + 1) < 0.5):
            return
        if arrived is not None and arrived():
            return
        started = time.perf_counter()
        with torch.inference_mode():  # the bonus token's guess, then k drafts
            guess, _ = self._draft(proposed, k + 1, _GREEDY, stop=arrived)
        self._ahead = (proposed + guess[:1], guess[1:])
        self.ahead_s += time.perf_counter() - started


_GREEDY = Sampler(Sampling())


def verify(logits: torch.Tensor, drafts: list[int], dists: list[torch.Tensor],
           sampler: Sampler) -> tuple[list[int], int]:
    """The target's logits [K+1, V] at the positions that predict each draft and the token after them
    -> (the tokens this step gives: the drafts that stand, then one correction or bonus token; how
    many drafts stood)."""
    for i, d in enumerate(drafts):
        if sampler.greedy:
            best = int(torch.argmax(logits[i]))
            if best != d:
                return drafts[:i] + [best], i
            continue
        p = sampler.probs(logits[i])
        p = p / p.sum()
        q = dists[i]
        if sampler.uniform() * float(q[d]) < float(p[d]):  # u < p/q without dividing by a tiny q
            continue
        residual = (p - q).clamp_(min=0)
        if float(residual.sum()) <= 0:  # p == q up to rounding: nothing to correct towards
            residual = p
        return drafts[:i] + [sampler.draw(residual)], i
    return drafts + [sampler(logits[len(drafts)])], len(drafts)


def speculative_steps(client: nn.Module, drafter: Drafter, prompt: list[int], position: int, max_new_tokens: int,
                      sampler: Sampler, stop_ids: set[int], max_length: int,
                      on_token: Callable[[int], None] = lambda _: None) -> Steps:
    """As `generation_steps`, with `prompt` the whole context (the target's caches hold its first
    `position` tokens already) and `max_length` the most positions the caches may hold."""
    result = GenerationResult(prompt_tokens=len(prompt) - position)
    started = first_at = time.perf_counter()
    device = next(client.parameters()).device
    tokens = list(prompt)  # the context: prompt, then every token given so far
    pending = prompt[position:]  # tokens the target's caches do not hold yet (at least one)
    policy = drafter.policy
    forwards0, forward_s0 = drafter.forwards, drafter.forward_s
    phases = result.phases = dict.fromkeys(("draft", "ahead", "swarm", "check"), 0.0)
    while True:
        room = min(max_new_tokens - len(result.token_ids) - 1, max_length - position - len(pending))
        k = policy.last_k = max(0, min(policy.choose(), room))
        t0 = time.perf_counter()
        drafts, dists = drafter.propose(tokens, k, sampler) if k else ([], [])
        draft_s = time.perf_counter() - t0
        fed = pending + drafts
        with torch.inference_mode():
            hidden = client.embed(torch.tensor([fed], dtype=torch.long, device=device))
        # if every draft stands, the next step starts after this one's bonus token, with this much room
        drafter.ahead_room = min(max_new_tokens - len(result.token_ids) - k - 2,
                                 max_length - position - len(pending) - k - 1)
        t1 = time.perf_counter()
        ahead0 = drafter.ahead_s
        out = yield hidden, position
        t2 = time.perf_counter()
        step_s, ahead_s = t2 - t1, drafter.ahead_s - ahead0
        with torch.inference_mode():
            logits = client.head(out[:, len(pending) - 1 :].to(hidden.device, hidden.dtype))[0].float()
        given, accepted = verify(logits, drafts, dists, sampler)
        phases["draft"] += t1 - t0
        phases["ahead"] += ahead_s
        phases["swarm"] += step_s - ahead_s  # sending, and waiting for the reply beyond working ahead
        phases["check"] += time.perf_counter() - t2
        result.draft_forwards = drafter.forwards - forwards0
        result.draft_forward_s = drafter.forward_s - forward_s0
        policy.observe(k, accepted, len(fed), step_s, draft_s)
        drafter.drafted += k
        drafter.accepted += accepted
        result.steps += 1
        result.drafted += k
        result.accepted += accepted
        position += len(pending) + accepted
        pending = [given[-1]]
        now = time.perf_counter()
        if result.steps == 1:
            first_at, result.time_to_first_token_s = now, now - started
        result.decode_s = now - first_at
        before = len(result.token_ids)
        for token in given:
            if token in stop_ids:
                result.stopped = True
                break
            result.token_ids.append(token)
            tokens.append(token)
            on_token(token)
            if len(result.token_ids) == max_new_tokens:
                break
        if result.steps == 1:  # the stop token counts: it was computed
            result.first_step_tokens = len(result.token_ids) - before + (1 if result.stopped else 0)
        if result.stopped or len(result.token_ids) >= max_new_tokens:
            return result


def draft_stats(result: GenerationResult, drafter: Drafter) -> dict[str, Any]:
    """What `--json` reports of a turn decoded with a draft."""
    given = len(result.token_ids) + (1 if result.stopped else 0)
    return {
        "model": drafter.name, "drafted": result.drafted, "accepted": result.accepted,
        "acceptance_rate": round(result.accepted / result.drafted, 4) if result.drafted else 0.0,
        "steps": result.steps, "tokens_per_step": round(given / result.steps, 3) if result.steps else 0.0,
        "draft_tokens_max": drafter.k_max, "proposals_drafted_ahead": drafter.ahead_hits,
        # where the turn's time went, the prompt's step included: drafting (and embedding) before a
        # step, drafting ahead while it crossed, the rest of its round trip, the target's head on the
        # checked positions and the check itself
        "ms": {k: round(1000 * v, 1) for k, v in result.phases.items()},
        "draft_forwards": result.draft_forwards,
        "draft_ms_per_forward": round(1000 * result.draft_forward_s / result.draft_forwards, 2)
                                if result.draft_forwards else None,
    }


def draft_dtype(name: str | None, device: str) -> torch.dtype | None:
    """`--draft-dtype`: None for "auto" (the target's dtype), else that dtype."""
    return None if name in (None, "auto") else resolve_dtype(name, device)


def load_drafter(name: str, target: ClientModel, max_length: int, k_max: int = DEFAULT_DRAFT_TOKENS,
                 progress: Progress = _noop, dtype: torch.dtype | None = None) -> Drafter:
    """The draft model `name` (a registry name, a folder, a hub id) on the target's device, in `dtype`
    (default: the target's; the draft's precision moves only how many drafts stand), every block
    in-process; refused in one line when its tokenizer is not the target's."""
    if not 1 <= k_max <= MAX_DRAFT_TOKENS:
        raise ModelError(f"--draft-tokens must be 1..{MAX_DRAFT_TOKENS}, got {k_max}")
    device = str(next(target.parts.parameters()).device)
    dtype = dtype or target.dtype
    draft = load_client_model(resolve(name), dtype, device, progress, with_blocks=True)
    mine, theirs = draft.tokenizer.get_vocab(), target.tokenizer.get_vocab()
    if mine != theirs:
        differ = sum(1 for t, i in theirs.items() if mine.get(t) != i) + sum(1 for t in mine if t not in theirs)
        raise ModelError(f"draft model {draft.spec.name} has a different tokenizer from {target.spec.name} "
                         f"({differ} of {len(theirs)} tokens differ): pick a draft with the same vocabulary, "
                         "e.g. a smaller model of the same family")
    chain = load_local_chain(draft.ckpt, dtype, device, max_length + k_max + 1, progress=progress)
    progress("timing the draft's threads", 0, None)
    return Drafter(draft.spec.name, draft.parts, chain, target.cfg.vocab_size, k_max,
                   step_threads=chain.spans[0].tune_threads())
