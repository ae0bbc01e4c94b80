"""CPU layouts: the head kept [hidden, vocab] (tied embeddings read the same storage), blocks with
widening products transposed and siblings fused; the same outputs either way."""

import pytest
import torch
from llmswarm.models.checkpoint import Checkpoint
from llmswarm.models.cpu_layout import TransposedLinear, transpose_head
from llmswarm.models.span import load_span
from torch import nn


class Parts(nn.Module):
    def __init__(self, tied: bool) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 8)
        self.lm_head = nn.Linear(8, 50, bias=False)
        if tied:
            self.lm_head.weight = self.embed.weight


def test_a_transposed_head_gives_the_linear_layers_logits_and_keeps_tied_embeddings_one_copy():
    torch.manual_seed(0)
    parts = Parts(tied=True)
    x, ids = torch.randn(2, 3, 8), torch.tensor([[0, 7, 49]])
    logits, embedded = parts.lm_head(x), parts.embed(ids)
    transpose_head(parts)
    assert isinstance(parts.lm_head, TransposedLinear)
    torch.testing.assert_close(parts.lm_head(x), logits)
    torch.testing.assert_close(parts.embed(ids), embedded, rtol=0, atol=0)
    assert parts.embed.weight.data_ptr() == parts.lm_head.weight_t.data_ptr()  # one copy
    assert parts.lm_head.weight.shape == (50, 8)


def test_an_untied_head_is_transposed_alone():
    parts = Parts(tied=False)
    before = parts.embed.weight.clone()
    transpose_head(parts)
    assert parts.embed.weight.is_contiguous() and torch.equal(parts.embed.weight, before)
    assert parts.embed.weight.data_ptr() != parts.lm_head.weight_t.data_ptr()


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_bloom"])
def test_cpu_blocks_are_laid_out_for_speed_and_compute_what_the_checkpoints_layout_does(request, fixture):
    ckpt = Checkpoint.open(request.getfixturevalue(fixture))
    plain = load_span(ckpt, 0, ckpt.config.num_blocks, torch.float32, layout=False)
    fast = load_span(ckpt, 0, ckpt.config.num_blocks, torch.float32)
    kinds = {type(m).__name__ for m in fast.blocks.modules()}
    assert "TransposedLinear" in kinds  # the widening products (head-like layout)
    if fixture == "tiny_llama":  # q/k/v and gate/up are one product each; the narrowing down stays nn.Linear
        attn, mlp = fast.blocks[0].self_attn, fast.blocks[0].mlp
        assert attn.qkv is not None and not hasattr(attn, "q_proj")
        assert mlp.gate_up is not None and isinstance(mlp.down_proj, nn.Linear)
    assert fast.nbytes == plain.nbytes  # moved, not copied
    torch.manual_seed(0)
    x = torch.randn(1, 5, ckpt.config.hidden_size)
    outs = []
    for span in (plain, fast):  # a prefill, then one decode row on the cache it left
        cache = span.new_cache(8)
        cache.reserve(0, 4)
        first = span.forward(x[:, :4], cache, 0)
        cache.reserve(4, 1)
        outs.append((first, span.forward(x[:, 4:], cache, 4)))
    for want, got in zip(*outs, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_quantised_and_non_float32_spans_keep_the_checkpoints_layers(tiny_llama):
    ckpt = Checkpoint.open(tiny_llama)
    span = load_span(ckpt, 0, 1, torch.bfloat16)
    assert span.blocks[0].self_attn.qkv is None and isinstance(span.blocks[0].mlp.up_proj, nn.Linear)
