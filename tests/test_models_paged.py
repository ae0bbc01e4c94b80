"""Paged KV cache and batched decode: same tokens as KVCache, alone or batched, and a pool that never
half-allocates."""

from __future__ import annotations

import pytest
import torch
from llmswarm.models.checkpoint import Checkpoint
from llmswarm.models.errors import CacheFullError, CachePositionError, SessionFullError
from llmswarm.models.paged_cache import PagePool
from llmswarm.models.span import load_client, load_span

FAMILIES = ["tiny_llama", "tiny_bloom"]


@pytest.fixture(autouse=True)
def _inference():
    with torch.inference_mode():  # the client's parts, as generate.py runs them
        yield


@pytest.fixture
def model(request):
    ckpt = Checkpoint.open(request.getfixturevalue(request.param))
    span = load_span(ckpt, 0, ckpt.config.num_blocks, torch.float32)
    return span, load_client(ckpt, torch.float32)


def fragmented_pool(span, num_pages: int, page_size: int) -> PagePool:
    """A pool whose free pages are every other one, so no sequence can grow contiguously."""
    pool = span.new_pool(num_pages, page_size)
    holders = [pool.sequence() for _ in range(num_pages)]
    for h in holders:
        h.reserve(0, 1)
    for h in holders[::2]:
        h.release()
    return pool


class Session:
    """One greedy session driven step by step on any cache."""

    def __init__(self, span, client, cache, prompt: list[int]) -> None:
        self.span, self.client, self.cache = span, client, cache
        self.next_ids, self.position, self.tokens = prompt, 0, []

    def hidden(self) -> torch.Tensor:
        return self.client.embed(torch.tensor([self.next_ids]))

    def take(self, out: torch.Tensor) -> None:
        """Consume the span's output [1, T, H] for `next_ids`: pick the next token."""
        self.position += len(self.next_ids)
        token = int(self.client.head(out[:, -1]).argmax())
        self.tokens.append(token)
        self.next_ids = [token]

    def step(self) -> torch.Tensor:
        self.cache.reserve(self.position, len(self.next_ids))  # the cache's owner makes room; spans assume it
        out = self.span.forward(self.hidden(), self.cache, self.position)
        self.take(out)
        return out

    def rewind(self, position: int, ids: list[int]) -> None:
        self.position, self.next_ids = position, ids


def script(session: Session) -> list[torch.Tensor]:
    """Prefill, decode, rewind to an earlier position and re-send other tokens, decode again."""
    outs = [session.step() for _ in range(12)]
    session.rewind(6, [3, 1, 4, 1, 5])
    outs += [session.step() for _ in range(10)]
    session.rewind(session.position, [])  # no-op rewind: keeps going from the same position
    return outs


@pytest.mark.parametrize("model", FAMILIES, indirect=True)
def test_paged_sequence_matches_kvcache(model):
    span, client = model
    prompt = [5, 17, 99, 3, 250, 7, 42, 11, 8]
    ref = Session(span, client, span.new_cache(64), prompt)
    ref_outs = script(ref)
    pool = span.new_pool(32, page_size=4)
    paged = Session(span, client, pool.sequence(), prompt)
    outs = script(paged)
    assert paged.cache.contiguous
    assert paged.tokens == ref.tokens
    for a, b in zip(outs, ref_outs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("model", FAMILIES, indirect=True)
def test_interleaved_noncontiguous_pages_match_kvcache(model):
    span, client = model
    pool = fragmented_pool(span, 40, page_size=2)
    prompts = [[5, 17, 99, 3, 250], [42, 11, 8, 7, 300, 1, 2]]
    refs = [Session(span, client, span.new_cache(64), p) for p in prompts]
    pageds = [Session(span, client, pool.sequence(), p) for p in prompts]
    for _ in range(14):  # grow both in turn: their pages alternate
        for ref, paged in zip(refs, pageds, strict=True):
            torch.testing.assert_close(paged.step(), ref.step(), rtol=0, atol=1e-5)
    for ref, paged in zip(refs, pageds, strict=True):  # rewind into the middle of a page, then go on
        ref.rewind(5, [9, 9])
        paged.rewind(5, [9, 9])
        for _ in range(4):
            torch.testing.assert_close(paged.step(), ref.step(), rtol=0, atol=1e-5)
        assert paged.tokens == ref.tokens
        assert not paged.cache.contiguous
    a, b = (p.cache.pages for p in pageds)
    assert not set(a) & set(b)


@pytest.mark.parametrize("model", FAMILIES, indirect=True)
@pytest.mark.parametrize("fragmented", [False, True])
def test_forward_batch_matches_sessions_alone(model, fragmented):
    span, client = model
    pool = fragmented_pool(span, 80, page_size=4) if fragmented else span.new_pool(40, page_size=4)
    prompts = [[5, 17, 99, 3, 250], [42, 11, 8, 7, 300, 1, 2, 9, 9, 13, 21], [77, 2]]
    refs = [Session(span, client, span.new_cache(64), p) for p in prompts]
    pageds = [Session(span, client, pool.sequence(), p) for p in prompts]
    for ref, paged in zip(refs, pageds, strict=True):  # prefill each alone
        torch.testing.assert_close(paged.step(), ref.step(), rtol=0, atol=1e-5)
    for i in range(20):
        if i == 10:  # one session rewinds mid-batch: re-sends a token at an earlier position
            refs[1].rewind(refs[1].position - 3, [123])
            pageds[1].rewind(pageds[1].position - 3, [123])
        hidden = torch.cat([p.hidden() for p in pageds])
        for p in pageds:
            p.cache.reserve(p.position, 1)
        out = span.forward_batch(hidden, [p.cache for p in pageds], [p.position for p in pageds])
        for row, ref, paged in zip(out, refs, pageds, strict=True):
            torch.testing.assert_close(row[None], ref.step(), rtol=0, atol=1e-5)
            paged.take(row[None])
    for ref, paged in zip(refs, pageds, strict=True):
        assert paged.tokens == ref.tokens
        assert paged.cache.length == ref.cache.length


@pytest.mark.parametrize("model", ["tiny_llama"], indirect=True)
def test_forward_batch_of_one_is_the_lone_path(model):
    span, client = model
    pool = span.new_pool(8, page_size=4)
    alone, batched = pool.sequence(), pool.sequence()
    x = client.embed(torch.tensor([[5, 17, 99]]))
    alone.reserve(0, 1)
    batched.reserve(0, 1)
    torch.testing.assert_close(span.forward_batch(x[:, :1], [batched], [0]), span.forward(x[:, :1], alone, 0),
                               rtol=0, atol=0)
    with pytest.raises(ValueError):
        span.forward_batch(x, [batched], [1])  # T = 3: only single-token steps batch
    with pytest.raises(ValueError):
        span.forward(x.expand(2, -1, -1), alone, 1)  # one session, two rows


def test_pool_exhaustion_allocates_nothing():
    pool = PagePool(num_layers=2, num_kv_heads=2, head_dim=8, num_pages=4, page_size=4)
    assert pool.bytes_per_page == 2 * 2 * 2 * 4 * 8 * 4
    assert pool.nbytes == 4 * pool.bytes_per_page
    seq = pool.sequence()
    seq.reserve(0, 6)
    seq.length = 6
    assert pool.free_pages == 2 and len(seq.pages) == 2
    with pytest.raises(CacheFullError, match="2 of 4 are free.*another server"):
        seq.reserve(6, 11)  # needs 3 more pages: takes none of the 2 free
    assert pool.free_pages == 2 and len(seq.pages) == 2
    other = pool.sequence()
    other.reserve(0, 8)
    with pytest.raises(CacheFullError):
        seq.reserve(6, 3)
    seq.release()
    assert pool.free_pages == 2 and seq.pages == [] and seq.length == 0
    seq.release()  # idempotent
    assert pool.free_pages == 2
    other.release()
    assert pool.free_pages == 4


def test_reserve_checks_like_kvcache():
    pool = PagePool(num_layers=1, num_kv_heads=1, head_dim=4, num_pages=8, page_size=4)
    seq = pool.sequence(max_length=10)
    with pytest.raises(CachePositionError, match="position 3, but the cache holds 0"):
        seq.reserve(3, 1)  # a gap
    with pytest.raises(SessionFullError, match="max length 10"):
        seq.reserve(0, 11)
    assert pool.free_pages == 8
    seq.reserve(0, 10)
    seq.length = 10
    seq.reserve(4, 2)  # a rewind keeps the pages
    assert len(seq.pages) == 3 and pool.free_pages == 5


def test_allocator_keeps_growing_sequences_contiguous():
    pool = PagePool(num_layers=1, num_kv_heads=1, head_dim=4, num_pages=64, page_size=2)
    seqs = [pool.sequence() for _ in range(4)]
    for n in range(1, 25):  # four sessions growing in turn
        for s in seqs:
            s.reserve(n - 1, 1)
            s.length = n
    assert all(s.contiguous for s in seqs)
    assert pool.free_pages == 64 - 4 * 12
    for s in seqs:
        s.release()
    prefilled = [pool.sequence() for _ in range(8)]
    for s in prefilled:  # prompts of 5 pages each, then every session decodes 2 more pages
        s.reserve(0, 10)
        s.length = 10
    for s in prefilled:
        s.reserve(10, 4)
    assert all(s.contiguous for s in prefilled)
    assert pool.free_pages == 64 - 8 * 7


@pytest.mark.parametrize("model", ["tiny_bloom"], indirect=True)
def test_full_pool_refuses_the_step_and_takes_nothing(model):
    span, client = model
    pool = span.new_pool(2, page_size=4)
    a, b = pool.sequence(), pool.sequence()
    x = client.embed(torch.tensor([[5, 17, 99, 3]]))
    for seq in (a, b):
        seq.reserve(0, 4)
        span.forward(x, seq, 0)
    with pytest.raises(CacheFullError, match="KV cache is full"):
        a.reserve(4, 1)
    assert (a.length, b.length, len(a.pages), pool.free_pages) == (4, 4, 1, 0)
