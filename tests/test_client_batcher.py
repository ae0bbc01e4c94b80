"""HeadBatcher (node/client/batcher.py) on its own, on trio's virtual clock: the heads of generations
asking in the same round run as one call and give the logits each gets alone; a lone generation never
waits; generations out of phase meet; an ask cancelled mid-wait leaves nothing behind."""

from __future__ import annotations

import torch
import trio
import trio.testing
from llmswarm.models.batched_head import HeadApplied, batched_head
from llmswarm.models.generate import Sampler, Sampling, generation_steps
from llmswarm.node.client.batcher import HeadBatcher
from torch import nn

H, V = 16, 97


class Parts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed_tokens = nn.Embedding(V, H)
        self.lm_head = nn.Linear(H, V, bias=False)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(ids)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)


def run(fn, *args) -> None:
    trio.run(fn, *args, clock=trio.testing.MockClock(autojump_threshold=0))


async def generation(batcher: HeadBatcher, seed: int, rounds: int, period_s: float, start_s: float,
                     outs: list) -> None:
    """A generation whose swarm step takes `period_s`: asks for the head of a fixed hidden state each round."""
    await trio.sleep(start_s)
    rows = torch.randn(rounds, 1, 1, H, generator=torch.Generator().manual_seed(seed))
    with batcher.generation() as me:
        for r in range(rounds):
            await trio.sleep(period_s)
            outs.append((rows[r], await batcher.head(me, rows[r])))


def test_generations_in_phase_share_one_call_with_the_logits_each_gets_alone():
    parts, outs = Parts(), []

    async def main():
        batcher = HeadBatcher(parts)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(batcher.serve)
            async with trio.open_nursery() as gens:
                for i in range(4):
                    gens.start_soon(generation, batcher, i, 6, 0.1 + 0.001 * i, 0.0, outs)
            nursery.cancel_scope.cancel()
        assert batcher.stats.largest == 4 and batcher.stats.rows == 24
        assert batcher.stats.batches <= 4 + 5  # the first round alone (nothing known yet), then one call each

    run(main)
    assert len(outs) == 24
    for row, logits in outs:
        alone = parts.head(row)
        torch.testing.assert_close(logits, alone)
        assert int(logits.argmax()) == int(alone.argmax())


def test_a_lone_generation_never_waits():
    async def main():
        batcher = HeadBatcher(Parts())
        async with trio.open_nursery() as nursery:
            nursery.start_soon(batcher.serve)
            with batcher.generation() as me:
                for _ in range(5):
                    await trio.sleep(0.2)
                    before = trio.current_time()
                    await batcher.head(me, torch.randn(1, 3, H))
                    assert trio.current_time() == before
            nursery.cancel_scope.cancel()

    run(main)


def test_generations_out_of_phase_meet():
    async def main():
        batcher = HeadBatcher(Parts())
        outs: list = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(batcher.serve)
            async with trio.open_nursery() as gens:
                gens.start_soon(generation, batcher, 1, 10, 0.1, 0.0, outs)
                gens.start_soon(generation, batcher, 2, 10, 0.1, 0.07, outs)  # 70% of a round behind
            nursery.cancel_scope.cancel()
        assert batcher.stats.largest == 2 and batcher.stats.batches <= 13

    run(main)


def test_a_cancelled_ask_leaves_no_row_and_the_batcher_carries_on():
    async def main():
        batcher = HeadBatcher(Parts())
        async with trio.open_nursery() as nursery:
            nursery.start_soon(batcher.serve)
            with batcher.generation() as a, batcher.generation() as b:
                for _ in range(3):  # both in phase: each round is one call
                    await trio.sleep(0.1)
                    async with trio.open_nursery() as both:
                        both.start_soon(batcher.head, a, torch.randn(1, 1, H))
                        both.start_soon(batcher.head, b, torch.randn(1, 1, H))
                await trio.sleep(0.1)
                with trio.move_on_after(0.01):  # a's ask waits for b (due), and is cancelled
                    await batcher.head(a, torch.randn(1, 1, H))
                assert batcher.pending == []
            with batcher.generation() as c:
                await batcher.head(c, torch.randn(1, 1, H))
            nursery.cancel_scope.cancel()

    run(main)


def test_generation_steps_fed_logits_by_the_batcher_equal_the_plain_loop():
    """The API's path (HeadApplied + logits from batched_head) samples what generation_steps alone does."""
    parts = Parts()

    def drive(client: nn.Module, head_outside: bool) -> list[int]:
        steps = generation_steps(client, [1, 2, 3], 0, 8, Sampler(Sampling()), set())
        hidden, _ = next(steps)
        try:
            while True:
                out = hidden * 0.5 + 1.0  # stand-in blocks
                hidden, _ = steps.send(batched_head(parts, [out[:, -1:]])[0] if head_outside else out)
        except StopIteration as done:
            return done.value.token_ids

    assert drive(HeadApplied(parts), True) == drive(parts, False)
