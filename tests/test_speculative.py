"""Speculative decoding (models/speculative.py): the sampler keeps the target's distribution, K follows
acceptance and link cost, the loop is token-identical to plain greedy decoding (in-process, and through
real servers with paged caches that rewind), and rewinds give pages back."""

from __future__ import annotations

import pytest
import torch
import trio
from llmswarm.models.checkpoint import Checkpoint
from llmswarm.models.generate import Sampler, Sampling, generation_steps, run_sync
from llmswarm.models.local import load_local_chain
from llmswarm.models.paged_cache import PagePool
from llmswarm.models.registry import REWIND_SLACK_PAGES
from llmswarm.models.span import load_client
from llmswarm.models.speculative import AdaptiveK, Drafter, speculative_steps, verify
from llmswarm.node.client.chat import drive
from llmswarm.node.client.remote import RemoteSpan
from llmswarm.node.client.session import open_session

MODEL = "tiny"  # what the in-process servers (conftest.py) announce

# -- the sampler -------------------------------------------------------------------------------------

P = torch.tensor([0.05, 0.40, 0.25, 0.20, 0.10])  # the target's next-token distribution
Q = torch.tensor([0.40, 0.05, 0.30, 0.05, 0.20])  # the draft's: far from it


def _first_tokens(accept_all: bool, n: int = 20000) -> torch.Tensor:
    """The first token a speculative step gives, n times, with drafts sampled from Q (one draft)."""
    sampler = Sampler(Sampling(temperature=1.0, seed=1234))
    logits = torch.stack([P.log(), P.log()])  # temperature 1: the sampler's distribution is P itself
    counts = torch.zeros(5)
    for _ in range(n):
        d = sampler.draw(Q)
        if accept_all:
            given = [d]
        else:
            given, _ = verify(logits, [d], [Q], sampler)
        counts[given[0]] += 1
    return counts / n


def test_speculative_sampling_keeps_the_target_distribution():
    freq = _first_tokens(accept_all=False)
    # 20000 draws: one standard deviation is at most 0.0035; 0.013 is nearly four of them
    assert (freq - P).abs().max() < 0.013, freq
    # the same check refuses a sampler that takes the draft's tokens as they come
    naive = _first_tokens(accept_all=True, n=4000)
    assert (naive - P).abs().max() > 0.1


def test_bonus_token_follows_the_target_when_every_draft_stands():
    sampler = Sampler(Sampling(temperature=1.0, seed=7))
    logits = torch.stack([P.log(), P.log()])
    counts = torch.zeros(5)
    n = 10000
    for _ in range(n):
        given, accepted = verify(logits, [1], [P], sampler)  # q == p: the draft always stands
        assert accepted == 1 and given[0] == 1
        counts[given[1]] += 1
    assert (counts / n - P).abs().max() < 0.018  # 10000 draws: sigma at most 0.005


def test_greedy_verify_keeps_drafts_up_to_the_first_disagreement():
    greedy = Sampler(Sampling())
    logits = torch.eye(6)[[2, 3, 4, 5]]  # the target says 2, then 3, then 4, then 5
    assert verify(logits, [2, 3, 4], [], greedy) == ([2, 3, 4, 5], 3)
    assert verify(logits, [2, 0, 4], [], greedy) == ([2, 3], 1)
    assert verify(logits[:1], [], [], greedy) == ([2], 0)


# -- choosing K --------------------------------------------------------------------------------------


def _policy(accept: float, step_s: float, draft_s: float, k_max: int = 8) -> AdaptiveK:
    policy = AdaptiveK(k_max)
    for i in range(40):
        k = 1 + i % k_max
        policy.observe(k, int(accept * k + 0.5), k + 1, step_s + 0.001 * k, draft_s * k)
    return policy


def test_k_grows_with_acceptance_and_link_latency():
    assert _policy(0.95, step_s=0.1, draft_s=0.01).choose() >= 6  # slow link, good draft: draft a lot
    assert _policy(0.0, step_s=0.1, draft_s=0.01).choose() == 0  # nothing accepted: stop drafting
    fast = _policy(0.6, step_s=0.005, draft_s=0.01).choose()  # the draft costs more than a round trip
    assert fast <= 1


def test_k_probes_again_after_a_run_of_zero():
    policy = _policy(0.0, step_s=0.1, draft_s=0.01)
    ks = [policy.choose() for _ in range(40)]
    assert 1 in ks and ks.count(0) >= 30


# -- the paged cache and the client's kept inputs rewind ---------------------------------------------


def test_rewinding_gives_pages_back():
    pool = PagePool(1, 1, 4, num_pages=32, page_size=4)
    seq = pool.sequence()
    seq.reserve(0, 40)  # 10 pages
    seq.length = 40
    seq.reserve(38, 3)  # a small rewind keeps its pages
    assert len(seq.pages) == 11 and seq.length == 38
    seq.length = 41
    seq.reserve(4, 2)  # rolled far back: keeps what position 6 needs plus the slack
    assert len(seq.pages) == 2 + REWIND_SLACK_PAGES and seq.length == 4
    assert pool.free_pages == 32 - len(seq.pages)
    seq.release()
    assert pool.free_pages == 32


def test_kept_inputs_follow_a_rollback():
    span = RemoteSpan(None, None, "s", hidden_size=2, max_length=32, dtype=torch.float32)  # type: ignore[arg-type]
    span.fed(torch.ones(1, 10, 2), 0)
    span.fed(torch.full((1, 5, 2), 2.0), 10)  # a step with drafts
    assert span.valid == 15
    span.fed(torch.full((1, 3, 2), 3.0), 12)  # two drafts stood: the next step is at 12
    assert span.valid == 15 and float(span.history[12:15].mean()) == 3.0
    span.fed(torch.full((1, 1, 2), 4.0), 13)
    assert span.valid == 14  # what lay past the accepted prefix is no longer replayed


# -- the loop, in-process and through real servers ----------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    ckpt = Checkpoint.open(tiny_llama)
    parts = load_client(ckpt, torch.float32)
    return ckpt, parts


@pytest.fixture(scope="module")
def random_draft(tmp_path_factory, tiny_llama) -> Checkpoint:
    """A random model of the same vocabulary, two small blocks: it rarely agrees with the target."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(99)
    cfg = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)
    folder = tmp_path_factory.mktemp("draft")
    LlamaForCausalLM(cfg).eval().save_pretrained(str(folder), safe_serialization=True)
    return Checkpoint.open(folder)


def _drafter(ckpt: Checkpoint, k: int = 4, adapt: bool = True) -> Drafter:
    d = Drafter("draft", load_client(ckpt, torch.float32), load_local_chain(ckpt, torch.float32, max_length=256),
                vocab_size=512, k_max=k)
    d.policy.adapt = adapt  # in-process a draft costs as much as a check: the rule would draft little
    return d


PROMPT = [1, 17, 99, 3, 250, 42, 7]


def _plain(ckpt, parts, n=40):
    chain = load_local_chain(ckpt, torch.float32, max_length=256)
    return run_sync(generation_steps(parts, PROMPT, 0, n, Sampler(Sampling()), set()), chain).token_ids


@pytest.mark.parametrize("probe", [None, "at the third poll"])
@pytest.mark.parametrize("which", ["target", "random"])
def test_greedy_with_a_draft_is_the_plain_greedy_answer(tiny, random_draft, which, probe):
    """`probe`: the session's poll for the reply (None: a libp2p stream, which cannot say). When the
    reply "arrives" at the third poll, each work ahead stops after two forwards, the rest of the
    proposal is drafted after the reply, and the answer is the same."""
    ckpt, parts = tiny
    drafter = _drafter(ckpt if which == "target" else random_draft, adapt=False)
    chain = load_local_chain(ckpt, torch.float32, max_length=256)
    partial = []

    def step(hidden, position):  # as the swarm session does: the draft works ahead once the step is sent
        if probe is None:
            drafter.work_ahead()
        else:
            polls = iter([False, False])
            before = drafter.forwards
            drafter.work_ahead(lambda: next(polls, True))
            partial.append(drafter.forwards - before)
        return chain(hidden, position)

    r = run_sync(speculative_steps(parts, drafter, PROMPT, 0, 40, Sampler(Sampling()), set(), 256), step)
    assert r.token_ids == _plain(ckpt, parts)
    if probe is not None:  # steps work ahead, the first too (the poll bounds it), but not past the budget
        assert partial[0] == 2 and partial[-1] == 0 and set(partial) <= {0, 2}
    if which == "target":
        assert r.accepted == r.drafted > 0 and r.steps < 40 / 3
        # every proposal but the first came from working ahead (with a poll, the second too)
        assert drafter.ahead_hits >= r.steps - (1 if probe else 2)
        # one draft forward per token given (the drafts, and the guesses of bonus tokens), and none
        # worked ahead past the last step: the token budget ends the generation there
        assert r.draft_forwards <= len(r.token_ids)
    else:
        assert r.accepted < r.drafted / 2


def test_the_drafts_cache_rewinds_to_a_changed_context(tiny, random_draft):
    ckpt, _ = tiny
    greedy = Sampler(Sampling())
    used, fresh = _drafter(random_draft), _drafter(random_draft)
    used.propose(PROMPT + [5, 6, 7, 8], 4, greedy)  # holds 11 + 3 tokens
    changed = PROMPT + [5, 9]
    drafts, _ = fresh.propose(changed, 4, greedy)
    assert used.propose(changed, 4, greedy) == (drafts, [])
    assert used.held == fresh.held == changed + drafts[:3]


def test_sampling_with_the_target_as_draft_accepts_nearly_everything(tiny):
    ckpt, parts = tiny
    chain = load_local_chain(ckpt, torch.float32, max_length=256)
    sampler = Sampler(Sampling(temperature=0.8, top_p=0.9, seed=3))
    r = run_sync(speculative_steps(parts, _drafter(ckpt, adapt=False), PROMPT, 0, 30, sampler, set(), 256), chain)
    assert len(r.token_ids) == 30 and r.accepted >= 0.8 * r.drafted > 0


@pytest.mark.slow  # real libp2p hosts: ~30 s on 2 busy cores
def test_speculative_steps_through_servers_rewind_their_paged_caches(tiny_llama, tiny, random_draft, host_swarm):
    """Two servers of real libp2p hosts; a random draft (a rewind nearly every step) and a plain session
    at once (the batched path), both identical to local; every page back after close."""
    ckpt, parts = tiny
    want = _plain(ckpt, parts, 60)
    results = {}

    async def run(swarm, whole):

        async def one(name, draft):
            async with open_session(swarm.client, swarm.chain(0, 1), MODEL, 64, 256, torch.float32) as s:
                for rnd in range(2):  # a second turn from position 0 rewinds every cache to the start
                    steps = (speculative_steps(parts, draft, PROMPT, 0, 60, Sampler(Sampling()), set(), 256)
                             if draft else generation_steps(parts, PROMPT, 0, 60, Sampler(Sampling()), set()))
                    results[name, rnd] = await drive(steps, s.step)

        async with trio.open_nursery() as n:
            n.start_soon(one, "draft", _drafter(random_draft, k=3))
            n.start_soon(one, "plain", None)
        await trio.sleep(0.5)  # the servers see the CLOSE and free the sessions
        for srv in swarm.servers:
            assert srv.cache_tokens_left == srv.cache_tokens

    host_swarm(tiny_llama, [(0, 3), (3, 6)], run)
    assert len(results) == 4
    for key, r in results.items():
        assert r.token_ids == want, key
    assert results["draft", 0].drafted > 0 and results["draft", 0].accepted < results["draft", 0].drafted



@pytest.mark.slow
def test_failover_mid_answer_replays_only_the_accepted_prefix(tiny_llama, tiny, random_draft, host_swarm):
    """Server 1 dies mid-answer, after steps whose drafts were refused (rewinds): the client re-routes
    to the spare, replays what it kept, and the answer is still the plain greedy one."""
    ckpt, parts = tiny
    want = _plain(ckpt, parts, 40)
    result = {}

    async def run(swarm, whole):
        async def replan(bans):
            return swarm.chain(0, 3, 2)

        async with open_session(swarm.client, swarm.chain(0, 1, 2), MODEL, 64, 256, torch.float32,
                                replan=replan, step_timeout_s=5) as s:
            count = 0

            async def step(hidden, position):
                nonlocal count
                count += 1
                if count == 6:
                    swarm.stop(1)
                    await trio.sleep(0.2)
                return await s.step(hidden, position)

            drafter = _drafter(random_draft, k=3)
            drafter.policy.probe_every = 1  # keep drafting (and being refused) every other step
            result["r"] = await drive(speculative_steps(parts, drafter, PROMPT, 0, 40, Sampler(Sampling()), set(),
                                                        256), step)
            result["recoveries"] = s.recoveries

    host_swarm(tiny_llama, [(0, 2), (2, 4), (4, 6), (2, 4)], run)
    assert result["recoveries"] == 1
    assert result["r"].token_ids == want
