"""Spans with their own caches generate exactly what transformers' generate() does."""

from __future__ import annotations

import pytest
import torch
from llmswarm.models.checkpoint import Checkpoint
from llmswarm.models.generate import Sampler, Sampling, generation_steps, run_sync
from llmswarm.models.local import load_local_chain
from llmswarm.models.span import load_client


def reference_ids(folder, prompt: list[int], new_tokens: int) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    out = model.generate(
        torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens,
        pad_token_id=0, eos_token_id=None,
    )
    return out[0, len(prompt):].tolist()


def ours(folder, prompt: list[int], new_tokens: int, splits: list[int]) -> list[int]:
    ckpt = Checkpoint.open(folder)
    client = load_client(ckpt, torch.float32)
    chain = load_local_chain(ckpt, torch.float32, splits=splits, max_length=128)
    steps = generation_steps(client, prompt, 0, new_tokens, Sampler(Sampling()), stop_ids=set())
    return run_sync(steps, chain).token_ids


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_bloom"])
@pytest.mark.parametrize("splits", [[], [2, 4], [3]])
def test_spans_match_transformers(request, fixture, splits):
    folder = request.getfixturevalue(fixture)
    prompt = [5, 17, 99, 3, 250, 7, 42, 11]
    assert ours(folder, prompt, 24, splits) == reference_ids(folder, prompt, 24)


def test_rewind_recomputes_identically(tiny_llama):
    """Sending a step at a position below the cache length rewinds the cache (used by multi-turn
    chats and replays). Bit-exact claims compare computations of the same shapes: a 3+3 split run
    twice, with a diverging step and a rewind in between, must give the same bits. Against one
    6-token prefill the matmul shapes differ, and so does float32 rounding (3.7e-8 seen on one
    machine, 0 on another): that comparison gets a tolerance of a few float32 ulps of the values."""
    ckpt = Checkpoint.open(tiny_llama)
    chain = load_local_chain(ckpt, torch.float32, splits=[3], max_length=64)
    client = load_client(ckpt, torch.float32)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    full = chain(client.embed(ids), 0)
    head = chain(client.embed(ids[:, :3]), 0)
    tail = chain(client.embed(ids[:, 3:]), 3)
    chain(client.embed(torch.tensor([[9, 9, 9]])), 3)  # diverge after 3 tokens
    again = chain(client.embed(ids[:, 3:]), 3)  # rewind to 3 and resend the original tail
    torch.testing.assert_close(again, tail, rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([head, tail], 1), full, rtol=1e-5, atol=1e-6)


def test_generations_interleaved_on_one_thread_stay_independent(tiny_llama):
    """An API drives many generations in turn on one thread: each must give what it gives alone
    (inference mode is per thread, so a generator must not hold it across its yields)."""
    ckpt = Checkpoint.open(tiny_llama)
    client = load_client(ckpt, torch.float32)
    prompts = [[5, 17, 99, 3], [250, 7, 42, 11, 8]]
    alone = []
    for p in prompts:
        chain = load_local_chain(ckpt, torch.float32, max_length=64)
        alone.append(run_sync(generation_steps(client, p, 0, 12, Sampler(Sampling()), stop_ids=set()), chain).token_ids)
    chains = [load_local_chain(ckpt, torch.float32, max_length=64) for _ in prompts]
    gens = [generation_steps(client, p, 0, 12, Sampler(Sampling()), stop_ids=set()) for p in prompts]
    pending = [next(g) for g in gens]
    results: list = [None, None]
    while any(r is None for r in results):
        for i, g in enumerate(gens):
            if results[i] is not None:
                continue
            hidden, position = pending[i]
            try:
                pending[i] = g.send(chains[i](hidden, position))
            except StopIteration as done:
                results[i] = done.value.token_ids
    assert results == alone
    # held across yields, the first generation to end would switch the mode off under the other, and
    # the last to end would leave it on for whatever this thread runs next
    assert not torch.is_inference_mode_enabled()
