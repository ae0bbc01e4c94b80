"""The CPU head kept [hidden, vocab]: same logits, and tied embeddings read the same storage."""

import torch
from llmswarm.models.head_layout import TransposedHead, transpose_head
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
    assert isinstance(parts.lm_head, TransposedHead)
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
