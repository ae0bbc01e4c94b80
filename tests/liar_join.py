"""A test fixture, not part of the product: `python tests/liar_join.py join ...` runs the real `join`
with its model's attention wrapped so that the span returns wrong outputs, and/or announcing a
speed it does not have. What it does is set by environment variables:

- LIAR_NOISE=S: add Gaussian noise of S times the attention output's standard deviation in every
  block (seeded, so it is the same on every run); unset or 0: outputs are honest.
- LIAR_RPS=R: announce R decode steps per second per block (and the matching throughput), whatever
  the server measures or serves.
"""

from __future__ import annotations

import os
import sys


def _patch() -> None:
    noise = float(os.environ.get("LIAR_NOISE", "0") or 0)
    if noise > 0:
        import torch
        from llmswarm.models import llama

        honest = llama.Attention.forward

        def corrupted(self, x, ctx, cache, layer):
            out = honest(self, x, ctx, cache, layer)
            gen = torch.Generator().manual_seed(1000 + layer)
            return out + noise * out.float().std() * torch.randn(out.shape, generator=gen).to(out.dtype)

        llama.Attention.forward = corrupted
    rps = float(os.environ.get("LIAR_RPS", "0") or 0)
    if rps > 0:
        from llmswarm.node.server import pace, process

        def boasted(span, *args, **kwargs):
            return process.Throughput(rps, rps, rps / span.num_blocks)

        process.measure_throughput = boasted
        pace.ServedSpeed.observe = lambda self, *a, **k: None  # served steps would tell the truth


if __name__ == "__main__":
    _patch()
    from llmswarm.cli.app import main

    sys.argv[0] = "llmswarm"
    main()
