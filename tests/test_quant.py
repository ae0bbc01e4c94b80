"""Quantised spans on CPU (bitsandbytes int8): outputs close to float, greedy tokens mostly the same,
clear one-line errors where a mode cannot run.

Tolerances: int8 keeps one scale per output row, so one linear layer's output moves by about
1/127 of its row's largest weight times the input's size; we ask for a relative error (norm of the
difference / norm of the float output) under 2% for one layer and 5% for a 6-block span, and for
teacher-forced greedy agreement of at least 90% on the tiny random models (measured here: 63/64
tokens for tiny_llama, 64/64 for tiny_bloom; random tiny models have flatter logits than trained
ones, so they are the harder case)."""

from __future__ import annotations

import builtins

import pytest
import torch
from llmswarm.models.checkpoint import Checkpoint
from llmswarm.models.errors import QuantError
from llmswarm.models.quant import check_quant, quantize_blocks
from llmswarm.models.span import load_client, load_span

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is the quant extra (./install.sh --dev installs it)")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_int8_linear_on_cpu_is_close_to_float():
    torch.manual_seed(0)
    blocks = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.Linear(512, 128))])
    x = torch.randn(4, 3, 256)
    with torch.inference_mode():
        ref = blocks[0](x)
        q = quantize_blocks(blocks, "int8", "cpu", torch.float32)
        out = q[0](x)
    assert isinstance(q[0][0], bnb.nn.Linear8bitLt)
    assert out.shape == ref.shape
    assert _rel(out, ref) < 0.02
    assert q[0][0].weight.dtype == torch.int8  # stored as int8, not float


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_bloom"])
def test_int8_span_is_close_and_greedy_tokens_agree(request, fixture):
    from llmswarm.bench.quant import greedy_reference, teacher_forced_agreement

    ckpt = Checkpoint.open(request.getfixturevalue(fixture))
    n = ckpt.config.num_blocks
    full = load_span(ckpt, 0, n, torch.float32)
    int8 = load_span(ckpt, 0, n, torch.float32, quant="int8")
    assert int8.quant == "int8" and full.quant == "none"
    assert int8.nbytes < 0.45 * full.nbytes  # int8 weights (+ row scales and norms) vs float32
    x = torch.randn(1, 12, ckpt.config.hidden_size, generator=torch.Generator().manual_seed(1))
    out_full = full.forward(x, full.new_cache(16), 0)
    out_int8 = int8.forward(x, int8.new_cache(16), 0)
    assert _rel(out_int8, out_full) < 0.05
    client = load_client(ckpt, torch.float32)
    agree = total = 0
    for seed in range(4):
        prompt = torch.randint(0, ckpt.config.vocab_size, (8,), generator=torch.Generator().manual_seed(seed)).tolist()
        ref = greedy_reference(client, [full], prompt, 16)
        a, t = teacher_forced_agreement(client, [full], prompt, ref)
        assert a == t  # the reference agrees with itself: the teacher-forced pass matches generation
        a, t = teacher_forced_agreement(client, [int8], prompt, ref)
        agree, total = agree + a, total + t
    assert agree / total >= 0.9, f"int8 agreed on {agree}/{total} greedy tokens"


def test_int8_span_serves_paged_batches(tiny_llama):
    """The server's batched decode path runs on quantised blocks too."""
    ckpt = Checkpoint.open(tiny_llama)
    span = load_span(ckpt, 0, 3, torch.float32, quant="int8")
    pool = span.new_pool(8, 16)
    seqs = [pool.sequence() for _ in range(2)]
    x = torch.randn(1, 4, ckpt.config.hidden_size)
    for s in seqs:
        s.reserve(0, 4)  # the cache's owner makes room; spans assume it
        span.forward(x, s, 0)
        s.reserve(4, 1)
    out = span.forward_batch(torch.randn(2, 1, ckpt.config.hidden_size), seqs, [4, 4])
    assert out.shape == (2, 1, ckpt.config.hidden_size) and torch.isfinite(out).all()


def test_nf4_without_cuda_is_one_clear_line():
    with pytest.raises(QuantError) as e:
        check_quant("nf4", "cpu")
    assert "needs a CUDA GPU" in str(e.value) and "\n" not in str(e.value)


def test_unknown_mode_and_missing_library_are_clear(monkeypatch):
    with pytest.raises(QuantError, match="use one of none, int8, nf4"):
        check_quant("int4", "cpu")
    assert check_quant("none", "cpu") == "none"
    real_import = builtins.__import__

    def no_bnb(name, *args, **kwargs):
        if name == "bitsandbytes":
            raise ImportError("No module named 'bitsandbytes'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    with pytest.raises(QuantError, match="not installed: install it with"):
        check_quant("int8", "cpu")
