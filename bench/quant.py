"""`llmswarm bench quant`: what each quantisation mode costs and changes, in one process.

For each mode (none = the full-precision reference, int8, nf4 where it runs): the span of every
block is loaded with that mode and measured for

    bytes_per_block     the blocks' weights as stored (quantisation scales included) / blocks
    cuda_bytes_per_block  on CUDA: torch.cuda.memory_allocated() added by loading, / blocks
    tokens_per_s        greedy decode of `new_tokens` tokens after the first prompt (median of rounds)
    agreement           greedy-token agreement with full precision over the fixed prompt set:
                        the reference generates `new_tokens` greedy tokens per prompt; the mode
                        reads the same prompt + reference tokens (teacher forcing) and we count the
                        positions where its own greedy choice is the reference token. Teacher forcing
                        keeps one early difference from counting every later token as different.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from typing import Any

import torch
from llmswarm.models.chat import Conversation
from llmswarm.models.device import dtype_name, resolve_device, resolve_dtype
from llmswarm.models.generate import Sampler, Sampling, generation_steps, run_sync
from llmswarm.models.local import LocalChain, load_client_model
from llmswarm.models.registry import resolve
from llmswarm.models.span import Span, load_span

PROMPTS = (  # fixed: the agreement figures in the README are over exactly these
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a transformer model is in two sentences.",
    "List three prime numbers greater than 10.",
    "Translate 'good morning' into Spanish.",
    "What does a compiler do?",
    "Give me a tip for learning to cook.",
    "Why is the sky blue?",
)


def greedy_reference(parts: torch.nn.Module, spans: list[Span], prompt: list[int], new_tokens: int) -> list[int]:
    chain = LocalChain(spans, len(prompt) + new_tokens + 1)
    steps = generation_steps(parts, prompt, 0, new_tokens, Sampler(Sampling()), stop_ids=set())
    return run_sync(steps, chain).token_ids


@torch.inference_mode()
def teacher_forced_agreement(parts: torch.nn.Module, spans: list[Span], prompt: list[int],
                             reference: list[int]) -> tuple[int, int]:
    """(positions where the spans' greedy token equals `reference`, positions compared), reading
    prompt + reference in one pass."""
    ids = torch.tensor([prompt + reference[:-1]], device=next(parts.parameters()).device)
    hidden = parts.embed(ids)
    for span in spans:
        hidden = span.forward(hidden, span.new_cache(ids.shape[1]), 0)
    logits = parts.head(hidden.to(next(parts.parameters()).dtype))[0, len(prompt) - 1 :]
    chosen = logits.argmax(-1).tolist()
    return sum(a == b for a, b in zip(chosen, reference, strict=True)), len(reference)


def bench_quant(model: str = "smollm2-135m", modes: Sequence[str] = ("none", "int8"), device: str = "auto",
                dtype: str | None = None, new_tokens: int = 32, rounds: int = 3,
                prompts: Sequence[str] = PROMPTS,
                progress: Callable[..., None] = lambda *a: None) -> dict[str, Any]:
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    client = load_client_model(resolve(model), torch_dtype, dev, progress, with_blocks=True)
    conv = Conversation(client.tokenizer)
    prompt_ids = [conv.prompt_ids(p) for p in prompts]
    n = client.cfg.num_blocks
    references: list[list[int]] = []
    rows = []
    for mode in modes:
        if dev.startswith("cuda"):
            torch.cuda.synchronize(dev)
            before = torch.cuda.memory_allocated(dev)
        span = load_span(client.ckpt, 0, n, torch_dtype, dev, progress, quant=mode)
        row: dict[str, Any] = {"quant": mode}
        if dev.startswith("cuda"):
            torch.cuda.synchronize(dev)
            row["cuda_bytes_per_block"] = (torch.cuda.memory_allocated(dev) - before) // n
        progress(f"{mode}: decoding", 0, None)
        greedy_reference(client.parts, [span], prompt_ids[0], 4)  # warm-up
        speeds = []
        for _ in range(rounds):
            chain = LocalChain([span], len(prompt_ids[0]) + new_tokens + 1)
            steps = generation_steps(client.parts, prompt_ids[0], 0, new_tokens, Sampler(Sampling()), stop_ids=set())
            speeds.append(run_sync(steps, chain).tokens_per_s)
        row["tokens_per_s"] = statistics.median(speeds)
        row["bytes_per_block"] = span.nbytes // n  # after a forward: bitsandbytes has set its scales
        if not references:  # the first mode is the reference
            references = [greedy_reference(client.parts, [span], p, new_tokens) for p in prompt_ids]
        agree = total = 0
        for p, ref in zip(prompt_ids, references, strict=True):
            a, t = teacher_forced_agreement(client.parts, [span], p, ref)
            agree, total = agree + a, total + t
        row["agreement"] = agree / total
        rows.append(row)
        del span
        if dev.startswith("cuda"):
            torch.cuda.empty_cache()
    base = rows[0]
    for row in rows:
        row["bytes_vs_reference"] = row["bytes_per_block"] / base["bytes_per_block"]
        row["speed_vs_reference"] = row["tokens_per_s"] / base["tokens_per_s"]
    return {"model": client.spec.name, "device": dev, "dtype": dtype_name(torch_dtype), "blocks": n,
            "reference": modes[0], "new_tokens": new_tokens, "prompts": len(prompts), "rounds": rounds,
            "threads": torch.get_num_threads(), "modes": rows}
