"""Tokenizers: a plain `tokenizers` tokenizer is read without transformers (models/tokenizer.py) and
gives exactly what transformers' AutoTokenizer gives; anything transformers changes on top of the
backend still goes through AutoTokenizer."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from llmswarm.models.chat import Conversation, TextStream
from llmswarm.models.errors import CheckpointError
from llmswarm.models.tokenizer import PlainTokenizer, load_tokenizer
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
    cls = json.loads((smollm2 / "tokenizer_config.json").read_text())["tokenizer_class"]
    assert cls in ("TokenizersBackend", "PreTrainedTokenizerFast")
    ours, auto = load_tokenizer(smollm2), AutoTokenizer.from_pretrained(str(smollm2))
    assert isinstance(ours, PlainTokenizer) and ours.special_tokens_map == auto.special_tokens_map
    assert _prompts(ours) == _prompts(auto)
    messages = [{"role": r, "content": c} for r, c in TURNS]
    for gen in (True, False):
        assert ours.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False) == \
            auto.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
    text = TURNS[3][1]
    assert ours(text)["input_ids"] == auto(text)["input_ids"]
    assert ours.get_vocab() == auto.get_vocab() and ours.eos_token_id == auto.eos_token_id
    ids = _prompts(auto)[-1] + auto(text)["input_ids"]
    assert ours.decode(ids, skip_special_tokens=True) == auto.decode(ids, skip_special_tokens=True)
    streamed = TextStream(ours)
    assert "".join(streamed.add(i) for i in ids) == streamed.text == auto.decode(ids, skip_special_tokens=True)


def test_loading_the_built_in_tokenizer_imports_no_transformers(smollm2):
    """What the plain path is for: `chat` starts 1.7 s sooner without transformers."""
    probe = ("import sys; from pathlib import Path; from llmswarm.models.tokenizer import load_tokenizer; "
             f"load_tokenizer(Path({str(smollm2)!r})); "
             "print(sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'torch')))")
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.replace("'", '"')) == []


@pytest.mark.parametrize("change", [{"tokenizer_class": "GPT2TokenizerFast"}, {"add_bos_token": True},
                                    {"clean_up_tokenization_spaces": True}, {"chat_template": "generation"}])
def test_what_transformers_changes_on_top_goes_through_autotokenizer(smollm2, tmp_path, monkeypatch, change):
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        shutil.copy(smollm2 / name, tmp_path / name)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    if change.get("chat_template") == "generation":  # a template marking what the assistant generated
        (tmp_path / "chat_template.jinja").write_text(
            "{% for m in messages %}{% generation %}{{ m['content'] }}{% endgeneration %}{% endfor %}")
    else:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({**cfg, **change}))
    seen = []
    real = AutoTokenizer.from_pretrained
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda *a, **k: seen.append(a) or real(*a, **k))
    tok = load_tokenizer(tmp_path)
    assert seen and not isinstance(tok, PlainTokenizer)
    assert tok("Paris")["input_ids"][-1] == load_tokenizer(smollm2)("Paris")["input_ids"][-1]
    (tmp_path / "tokenizer_config.json").write_text("{not json")  # nobody can read it: one clear error
    with pytest.raises(CheckpointError, match="cannot load the tokenizer"):
        load_tokenizer(tmp_path)


def test_a_chat_template_cannot_reach_python_internals(smollm2, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2 / name, tmp_path / name)
    (tmp_path / "chat_template.jinja").write_text("{{ messages.__class__.__mro__ }}")
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, PlainTokenizer)
    with pytest.raises(Exception, match="unsafe|access"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    (tmp_path / "chat_template.jinja").write_text("{% set ns = namespace(_x=1) %}{{ raise_exception('no') }}")
    with pytest.raises(Exception, match="namespace|cannot set"):
        load_tokenizer(tmp_path).apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
