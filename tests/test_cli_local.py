"""`llmswarm chat --local` as a user runs it: a real process, the built-in model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

LLMSWARM = [sys.executable, "-m", "llmswarm.cli.app"]


def run(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([*LLMSWARM, *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_chat_local_answers_paris(smollm2):
    res = run("chat", "--model", "smollm2-135m", "--local", "--prompt", "What is the capital of France?",
              "--json", "--max-new-tokens", "24")
    assert res.returncode == 0, res.stderr
    record = json.loads(res.stdout)
    assert "Paris" in record["text"]
    assert record["token_ids"] and record["prompt_tokens"] > 5 and record["model"] == "smollm2-135m"
    assert record["tokens_per_s"] > 0


@pytest.mark.slow
def test_chat_local_streams_text(smollm2):
    res = run("chat", "--local", "-p", "What is the capital of France?", "-n", "16")
    assert res.returncode == 0, res.stderr
    assert "Paris" in res.stdout and "tokens/s" in res.stderr


@pytest.mark.slow
def test_interactive_chat_answers_each_turn(smollm2):
    res = subprocess.run([*LLMSWARM, "chat", "--local", "-n", "12"], capture_output=True, text=True, timeout=180,
                         input="What is the capital of France?\nAnd of Italy?\n")
    assert res.returncode == 0, res.stderr
    assert res.stderr.count("tokens/s") == 2 and "Paris" in res.stdout


def test_second_turn_with_cache_equals_fresh_run(smollm2):
    """Turn 2 fed incrementally on top of turn 1's cache gives the same reply as the whole
    conversation prefilled from scratch."""
    import torch
    from llmswarm.models.chat import ChatTurn, Conversation
    from llmswarm.models.generate import Sampler, Sampling, run_sync
    from llmswarm.models.local import load_client_model, load_local_chain
    from llmswarm.models.registry import resolve

    model = load_client_model(resolve("smollm2-135m"), torch.float32, with_blocks=True)
    chain = load_local_chain(model.ckpt, torch.float32, max_length=512, splits=[10, 20])
    conv = Conversation(model.tokenizer)
    greedy = Sampler(Sampling())
    first = ChatTurn(model, conv, "What is the capital of France?", 16, greedy)
    first.finish(run_sync(first.steps, chain))
    second = ChatTurn(model, conv, "And of Italy?", 16, greedy)
    assert second.steps.gi_frame.f_locals["position"] > 0  # only the new tokens are fed
    cached_reply = second.finish(run_sync(second.steps, chain)).token_ids

    fresh_conv = Conversation(model.tokenizer)
    fresh_conv.messages = conv.messages[:-2]  # both turns of history, minus the second answer
    fresh = ChatTurn(model, fresh_conv, "And of Italy?", 16, greedy)
    assert fresh.steps.gi_frame.f_locals["position"] == 0
    fresh_chain = load_local_chain(model.ckpt, torch.float32, max_length=512)
    assert fresh.finish(run_sync(fresh.steps, fresh_chain)).token_ids == cached_reply


@pytest.mark.parametrize("model,needle", [("gpt-17", "unknown model"), ("/no/such/dir", "does not exist")])
def test_bad_model_is_one_line_and_exit_3(model, needle):
    res = run("chat", "--model", model, "--local", "--prompt", "hi", timeout=60)
    assert res.returncode == 3
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in res.stderr


def test_models_lists_builtin():
    res = run("models", "--json", timeout=60)
    assert res.returncode == 0, res.stderr
    names = {m["name"] for m in json.loads(res.stdout)["models"]}
    assert {"smollm2-135m", "bloom-176b", "llama-3.1-70b"} <= names
