"""The thread count of one-row steps: chosen by timing, applied to those steps alone."""

import time

import pytest
import torch
from llmswarm.models import threads
from llmswarm.models.threads import FEW_ROWS, StepThreads, candidates, tune_count


def test_candidates_double_up_to_the_machine():
    assert candidates(1) == [1]
    assert candidates(2) == [1, 2]
    assert candidates(6) == [1, 2, 4, 6]
    assert candidates(8) == [1, 2, 4, 8]


@pytest.mark.parametrize(("cost_ms", "want"), [
    ({1: 10.0, 2: 10.2, 4: 10.1}, 1),  # no gain from more threads: the fewest
    ({1: 10.0, 2: 6.0, 4: 5.9}, 2),  # 4 is not enough faster than 2 to take two more cores
    ({1: 10.0, 2: 6.0, 4: 3.0}, 4),
])
def test_tuning_keeps_the_fewest_threads_within_tolerance_of_the_fastest(monkeypatch, cost_ms, want):
    monkeypatch.setattr(threads, "IDLE_GAP_S", 0.0)
    clock = [0.0]
    monkeypatch.setattr(threads.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(threads.time, "sleep", lambda s: None)

    def step():
        clock[0] += cost_ms[torch.get_num_threads()] / 1000

    before = torch.get_num_threads()
    assert tune_count(step, max_threads=4, gap_s=0.0) == want
    assert torch.get_num_threads() == before


def test_a_span_runs_small_steps_with_their_thread_counts_and_big_ones_with_all():
    from llmswarm.models.config import ModelConfig
    from llmswarm.models.span import Span
    from torch import nn

    seen: list[int] = []

    class Probe(nn.Module):
        def forward(self, x, ctx, cache, i):
            seen.append(torch.get_num_threads())
            return x

    cfg = ModelConfig(family="llama", model_type="llama", num_blocks=1, hidden_size=8, num_heads=2,
                      num_kv_heads=2, head_dim=4, intermediate_size=16, vocab_size=16, norm_eps=1e-5,
                      tie_word_embeddings=True, max_position_embeddings=64)
    span = Span(cfg, 0, 1, nn.ModuleList([Probe()]), torch.float32, "cpu", step_threads=StepThreads(1, 3))
    cache = span.new_cache(64)
    total = torch.get_num_threads()
    span.forward(torch.zeros(1, FEW_ROWS + 1, 8), cache, 0)
    span.forward(torch.zeros(1, 1, 8), cache, FEW_ROWS + 1)
    span.forward(torch.zeros(1, 4, 8), cache, FEW_ROWS + 2)
    assert seen == [total, 1, 3] and torch.get_num_threads() == total
    assert span.sub(0, 1).step_threads == StepThreads(1, 3)


def test_tuning_a_real_span_picks_a_count_and_keeps_outputs(tiny_llama):
    from llmswarm.models.checkpoint import Checkpoint
    from llmswarm.models.span import load_span

    span = load_span(Checkpoint.open(tiny_llama), 0, 2, torch.float32)
    cache = span.new_cache(4)
    x = torch.randn(1, 1, span.cfg.hidden_size)
    before = span.forward(x, cache, 0)
    started = time.perf_counter()
    chosen = span.tune_threads()
    assert {chosen.one_row, chosen.few_rows} <= set(candidates(torch.get_num_threads()))
    assert span.step_threads == chosen and time.perf_counter() - started < 30
    cache = span.new_cache(4)
    torch.testing.assert_close(span.forward(x, cache, 0), before)
