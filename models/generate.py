"""Generation, written once for every way of running the blocks.

`generation_steps()` is a sans-IO coroutine: it yields `(hidden, position)` for the blocks and is
sent back their output. `chat --local` drives it with spans in-process (`run_sync`); the swarm
client drives it with `await session.step(...)`. Same tokens either way, by construction.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field

import torch
from torch import nn

BlockInput = tuple[torch.Tensor, int]  # hidden [1, T, H], absolute position of its first token
Steps = Generator[BlockInput, torch.Tensor, "GenerationResult"]


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None


@dataclass
class GenerationResult:
    token_ids: list[int] = field(default_factory=list)  # generated ids, stop token excluded
    stopped: bool = False  # ended on a stop token (not on max_new_tokens)
    prompt_tokens: int = 0
    time_to_first_token_s: float = 0.0
    decode_s: float = 0.0  # from the first generated token to the last
    steps: int = 0  # times the blocks ran (swarm round trips), the prompt's included
    first_step_tokens: int = 1  # tokens the first step gave (more than one with a draft)
    drafted: int = 0  # draft tokens proposed (speculative decoding, models/speculative.py)
    accepted: int = 0  # of which the target model accepted
    # speculative decoding: where the time went, seconds by phase (models/speculative.py), and how
    # many draft-model forwards ran (those worked ahead included, kept or not)
    phases: dict[str, float] = field(default_factory=dict)
    draft_forwards: int = 0
    draft_forward_s: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        # tokens after the first step's, over the time since it (a stop token counts: it was computed)
        n = len(self.token_ids) + (1 if self.stopped else 0) - self.first_step_tokens
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0


class Sampler:
    def __init__(self, sampling: Sampling) -> None:
        self.s = sampling
        self.gen = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None

    @property
    def greedy(self) -> bool:
        return self.s.temperature <= 0

    def __call__(self, logits: torch.Tensor) -> int:
        """logits [V] -> token id."""
        if self.greedy:
            return int(torch.argmax(logits))
        return self.draw(self.probs(logits))

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The distribution a token is sampled from (temperature, then top-p), on the CPU; unnormalised
        after top-p (multinomial normalises)."""
        probs = torch.softmax(logits.float().cpu() / self.s.temperature, dim=-1)  # the generator is on CPU
        if self.s.top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_p, 0) - sorted_p < self.s.top_p
            probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
        return probs

    def draw(self, probs: torch.Tensor) -> int:
        return int(torch.multinomial(probs, 1, generator=self.gen))

    def uniform(self) -> float:
        return float(torch.rand((), generator=self.gen))


def generation_steps(
    client: nn.Module,
    new_ids: list[int],
    position: int,
    max_new_tokens: int,
    sampler: Sampler,
    stop_ids: set[int],
    on_token: Callable[[int], None] = lambda _: None,
) -> Steps:
    """Feed `new_ids` at `position` (the tokens already in the caches), then decode.

    The last generated token is NOT fed back: it is the start of the next turn's input.
    """
    result = GenerationResult(prompt_tokens=len(new_ids))
    started = time.perf_counter()
    device = next(client.parameters()).device  # the client's parts may live on a GPU
    ids = torch.tensor([new_ids], dtype=torch.long, device=device)
    first_at = started
    # Inference mode is per thread: it is entered around each piece of work and never held across a
    # yield, so several generations driven in turn on one thread (an API's requests) stay independent.
    for step in range(max_new_tokens):
        with torch.inference_mode():
            hidden = client.embed(ids)
        out = yield hidden, position
        result.steps += 1
        position += ids.shape[1]
        with torch.inference_mode():
            token = sampler(client.head(out[:, -1:].to(hidden.device, hidden.dtype))[0, -1])
        now = time.perf_counter()
        if step == 0:
            first_at = now
            result.time_to_first_token_s = now - started
        result.decode_s = now - first_at
        if token in stop_ids:
            result.stopped = True
            break
        result.token_ids.append(token)
        on_token(token)
        ids = torch.tensor([[token]], dtype=torch.long, device=device)
    return result


def run_sync(steps: Steps, run_blocks: Callable[[torch.Tensor, int], torch.Tensor]) -> GenerationResult:
    """Drive `steps` with a synchronous block runner."""
    try:
        hidden, position = next(steps)
        while True:
            hidden, position = steps.send(run_blocks(hidden, position))
    except StopIteration as done:
        return done.value
