"""`chat --draft` end to end: real processes, the session's shared swarm of the built-in model (3 servers),
the draft run in the client process. Greedy answers equal `chat --local` token for token, whether the
draft is the target itself (every draft accepted, several tokens per swarm step) or a random-init model
with the same tokenizer (few accepted); a draft with another tokenizer is refused in one line."""

from __future__ import annotations

import json
import subprocess

import pytest
from llmswarm.bench.local_swarm import llmswarm_command
from llmswarm.bench.speculative import make_random_draft

E2E_PROMPT = "What is the capital of France?"  # conftest.py's local_answer prompt

pytestmark = pytest.mark.slow


def _chat(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(llmswarm_command("chat", "--prompt", E2E_PROMPT, "--json", "-n", "24", *args),
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def random_draft(smollm2, tmp_path_factory):
    return make_random_draft(smollm2, tmp_path_factory.mktemp("random-draft"))


def test_draft_equal_to_the_target_accepts_everything(swarm3, local_answer):
    res = _chat("--peers", swarm3.peers[0], "--draft", "smollm2-135m", "--draft-tokens", "4")
    assert res.returncode == 0, res.stderr
    answer = json.loads(res.stdout)
    assert answer["token_ids"] == local_answer["token_ids"]
    draft = answer["draft"]
    assert draft["acceptance_rate"] >= 0.9 and draft["tokens_per_step"] > 2
    assert answer["steps"] < len(answer["token_ids"]) / 2


def test_random_draft_is_mostly_refused_and_changes_nothing(swarm3, local_answer, random_draft):
    res = _chat("--peers", swarm3.peers[0], "--draft", str(random_draft))
    assert res.returncode == 0, res.stderr
    answer = json.loads(res.stdout)
    assert answer["token_ids"] == local_answer["token_ids"]
    assert answer["draft"]["drafted"] > 0 and answer["draft"]["acceptance_rate"] < 0.5


def test_draft_with_another_tokenizer_is_one_clear_line(random_draft, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    for f in random_draft.iterdir():
        other.joinpath(f.name).write_bytes(f.read_bytes())
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = list(vocab)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # two tokens swap ids: same size, another tokenizer
    (other / "tokenizer.json").write_text(json.dumps(tok))
    res = _chat("--local", "--draft", str(other))
    assert res.returncode == 3, res.stderr  # a model error
    lines = [line for line in res.stderr.strip().splitlines() if line.strip()]
    assert "different tokenizer" in lines[-1] and "Traceback" not in res.stderr
