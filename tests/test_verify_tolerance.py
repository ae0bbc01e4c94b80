"""The tolerance of output checks, validated on the built-in model without a network: the same blocks
in float32 and in bfloat16 (a swarm mixing CPU and GPU servers) over 100 prompts stay within
`relative_tolerance` (no false alarm), while a corrupted span (the e2e tests' fixture: noise in its
attention) is far outside it."""

from __future__ import annotations

import copy

import pytest
import torch
from llmswarm.models import llama
from llmswarm.models.chat import Conversation
from llmswarm.models.local import load_client_model
from llmswarm.models.precision import relative_error, relative_tolerance
from llmswarm.models.registry import resolve
from llmswarm.models.span import load_span

pytestmark = pytest.mark.slow
SUBJECTS = ("the sea", "a dragon", "taxes", "gravity", "a lighthouse", "bread", "Paris", "prime numbers",
            "a violin", "winter")
ASKS = ("Tell me about {}.", "Write a poem about {}.", "What is {}?", "Explain {} to a child.",
        "Give three facts about {}.", "Why does {} matter?", "Describe {} in one sentence.",
        "Summarise the history of {}.", "Is {} dangerous?", "Compare {} with the moon.")
PROMPTS = [a.format(s) for a in ASKS for s in SUBJECTS]  # 100
DECODE_PROMPTS, DECODE_STEPS = 5, 8  # greedy decode steps after a few prompts' prefill (bfloat16 on CPU is slow)


@pytest.fixture(scope="module")
def model(smollm2):
    return load_client_model(resolve("smollm2-135m"), torch.float32)


def test_float32_and_bfloat16_agree_within_the_tolerance_over_100_prompts(model):
    n = model.cfg.num_blocks
    f32 = load_span(model.ckpt, 0, n, torch.float32)
    b16 = load_span(model.ckpt, 0, n, torch.bfloat16)
    tol = relative_tolerance([("float32", "none")], [("bfloat16", "none")])
    prompts = [Conversation(model.tokenizer).prompt_ids(p) for p in PROMPTS]
    shared = next(i for i in range(min(map(len, prompts))) if len({p[i] for p in prompts}) > 1)
    longest = max(map(len, prompts)) + DECODE_STEPS
    worst = 0.0
    with torch.inference_mode():
        # the chat template's shared start is computed once (and checked once), then each prompt goes on
        # from a copy of both caches: the check still covers every position of every prompt
        base32, base16 = f32.new_cache(longest), b16.new_cache(longest)
        base32.reserve(0, shared)
        base16.reserve(0, shared)
        x = model.parts.embed(torch.tensor([prompts[0][:shared]]))
        worst = float(relative_error(b16.forward(x.to(torch.bfloat16), base16, 0), f32.forward(x, base32, 0)).max())
        for k, ids in enumerate(prompts):
            c32, c16 = copy.deepcopy(base32), copy.deepcopy(base16)
            x, pos = model.parts.embed(torch.tensor([ids[shared:]])), shared
            for _ in range(1 + (DECODE_STEPS if k < DECODE_PROMPTS else 0)):
                c32.reserve(pos, x.shape[1])
                c16.reserve(pos, x.shape[1])
                y32, y16 = f32.forward(x, c32, pos), b16.forward(x.to(torch.bfloat16), c16, pos)
                worst = max(worst, float(relative_error(y16, y32).max()))
                pos += x.shape[1]
                x = model.parts.embed(model.parts.head(y32[:, -1:]).argmax(-1))
    assert worst < tol, f"float32 vs bfloat16 differ by {worst:.4f}, above the tolerance {tol:.4f}"
    assert worst > tol / 10  # the tolerance is not loose by orders of magnitude either


def test_a_corrupted_span_is_far_outside_the_tolerance(model, monkeypatch):
    first, honest = load_span(model.ckpt, 0, 10, torch.float32), load_span(model.ckpt, 10, 20, torch.float32)
    honest_forward = llama.Attention.forward

    def noisy(self, x, ctx, cache, layer):  # as tests/liar_join.py with LIAR_NOISE=2
        out = honest_forward(self, x, ctx, cache, layer)
        gen = torch.Generator().manual_seed(1000 + layer)
        return out + 2 * out.float().std() * torch.randn(out.shape, generator=gen)

    tol = relative_tolerance([("float32", "none")], [("bfloat16", "none")])
    with torch.inference_mode():
        ids = Conversation(model.tokenizer).prompt_ids(PROMPTS[0])
        x = first.forward(model.parts.embed(torch.tensor([ids])), _cache(first, len(ids)), 0)
        good = honest.forward(x, _cache(honest, len(ids)), 0)
        monkeypatch.setattr(llama.Attention, "forward", noisy)
        bad = honest.forward(x, _cache(honest, len(ids)), 0)
    assert float(relative_error(bad, good).max()) > 3 * tol


def _cache(span, tokens: int):
    cache = span.new_cache(tokens)
    cache.reserve(0, tokens)
    return cache
