"""Tokenizers: a plain `tokenizers` tokenizer is loaded through its class, skipping AutoTokenizer's
model imports, and gives exactly what AutoTokenizer gives; any other class still takes AutoTokenizer."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

from llmswarm.models.chat import Conversation, TextStream, load_tokenizer, tokenizer_class
from transformers import AutoTokenizer

TURNS = [
    ("system", "You answer in one short sentence."),
    ("user", "What is the capital of France?"),
    ("assistant", "The capital of France is Paris."),
    ("user", "And of Japan? Écris-le aussi en 日本語 🙂, with  two spaces\tand a tab."),
]


def _prompts(tok) -> list[list[int]]:
    """The ids a chat feeds, turn by turn, with and without a system prompt."""
    out = []
    for system in (None, TURNS[0][1]):
        conv = Conversation(tok, system=system)
        out.append(conv.prompt_ids(TURNS[1][1]))
        conv.finish_turn(out[-1], [], True, TURNS[2][1])
        out.append(conv.prompt_ids(TURNS[3][1]))
    return out


def test_the_built_in_tokenizer_is_loaded_plainly_and_equals_autotokenizer(smollm2):
    assert tokenizer_class(smollm2) in ("TokenizersBackend", "PreTrainedTokenizerFast")
    ours, auto = load_tokenizer(smollm2), AutoTokenizer.from_pretrained(str(smollm2))
    assert _prompts(ours) == _prompts(auto)
    text = TURNS[3][1]
    assert ours(text)["input_ids"] == auto(text)["input_ids"]
    assert ours.get_vocab() == auto.get_vocab() and ours.eos_token_id == auto.eos_token_id
    ids = _prompts(auto)[-1] + auto(text)["input_ids"]
    assert ours.decode(ids, skip_special_tokens=True) == auto.decode(ids, skip_special_tokens=True)
    streamed = TextStream(ours)
    assert "".join(streamed.add(i) for i in ids) == streamed.text == auto.decode(ids, skip_special_tokens=True)


def test_loading_the_built_in_tokenizer_imports_no_model_code(smollm2):
    """What the plain path is for: `chat` starts without transformers' modelling imports (1.6 s)."""
    probe = ("import sys; from pathlib import Path; from llmswarm.models.chat import load_tokenizer; "
             f"load_tokenizer(Path({str(smollm2)!r})); "
             "print(sorted(m for m in sys.modules if m.startswith('transformers.models.') or m == 'torch._dynamo'))")
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.replace("'", '"')) == []


def test_another_tokenizer_class_goes_through_autotokenizer(smollm2, tmp_path, monkeypatch):
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        shutil.copy(smollm2 / name, tmp_path / name)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**cfg, "tokenizer_class": "GPT2TokenizerFast"}))
    seen = []
    real = AutoTokenizer.from_pretrained
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda *a, **k: seen.append(a) or real(*a, **k))
    tok = load_tokenizer(tmp_path)
    assert seen and tok("Paris")["input_ids"] == load_tokenizer(smollm2)("Paris")["input_ids"]
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    assert tokenizer_class(tmp_path) is None
