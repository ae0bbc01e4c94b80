"""Conversation state on the client: chat template, the tokens already in the caches, streaming text.

Multi-turn chats reuse the block caches: each turn feeds only the tokens that follow what the caches
hold. If the re-rendered conversation diverges from the cached tokens (a reply that re-tokenises
differently), the next step is sent at the first differing position and the caches rewind there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .config import ModelConfig
from .errors import LengthError
from .generate import GenerationResult, Sampler, Steps, generation_steps

STOP_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "</s>", "<|end|>")


def stop_ids(tokenizer: Any, cfg: ModelConfig) -> set[int]:
    ids = set(cfg.eos_token_ids)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in STOP_TOKENS if t in vocab)
    return ids


class Conversation:
    def __init__(self, tokenizer: Any, system: str | None = None) -> None:
        self.tok = tokenizer
        self.messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
        self.cached: list[int] = []  # token ids whose keys/values the block caches hold
        self.has_template = bool(getattr(tokenizer, "chat_template", None))

    def prompt_ids(self, user_text: str) -> list[int]:
        """All token ids of the conversation so far plus the new user turn, ready for the reply."""
        self.messages.append({"role": "user", "content": user_text})
        if not self.has_template:  # base models: plain continuation of all text so far
            text = "\n".join(m["content"] for m in self.messages)
            return list(self.tok(text)["input_ids"])
        out = self.tok.apply_chat_template(self.messages, add_generation_prompt=True, tokenize=True)
        if isinstance(out, dict) or hasattr(out, "input_ids"):
            out = out["input_ids"]
        return list(out)

    def split(self, ids: list[int]) -> tuple[list[int], int]:
        """(tokens to feed, position to feed them at): everything after the common prefix with the cache."""
        common = 0
        for a, b in zip(self.cached, ids, strict=False):
            if a != b:
                break
            common += 1
        common = min(common, len(ids) - 1)  # always feed at least one token to get logits
        return ids[common:], common

    def finish_turn(self, prompt: list[int], generated: list[int], stopped: bool, reply: str) -> None:
        """After a reply the caches hold the prompt and every generated token that was fed back:
        all of them when a stop token ended the reply, all but the last otherwise."""
        self.cached = prompt + (generated if stopped else generated[:-1])
        self.messages.append({"role": "assistant", "content": reply})


class TextStream:
    """Turns generated ids into printable text pieces, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        self.ids: list[int] = []
        self.printed = 0  # characters of the decoded text already emitted

    def add(self, token: int) -> str:
        self.ids.append(token)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        piece, self.printed = text[self.printed :], len(text)
        return piece

    @property
    def text(self) -> str:
        return self.tok.decode(self.ids, skip_special_tokens=True)


@dataclass
class TurnResult:
    """One answer: what `chat --json` prints."""

    text: str
    token_ids: list[int]
    tokens_per_s: float
    prompt_tokens: int
    model: str
    time_to_first_token_s: float
    new_tokens: int
    steps: int = 0  # times the blocks ran (swarm round trips)
    draft: dict[str, Any] | None = None  # with a draft model: acceptance, tokens per step (models/speculative.py)


class ChatTurn:
    """One user message -> one reply, independent of how the blocks are run."""

    def __init__(self, model: Any, conv: Conversation, user_text: str, max_new_tokens: int,
                 sampler: Sampler, on_text: Callable[[str], None] = lambda _: None,
                 max_length: int | None = None, drafter: Any = None) -> None:
        """`max_length`: the most tokens the caches hold (prompt and answer). A conversation that
        does not fit is refused before any block runs; an answer that would not fit stops there
        (`truncated`), with what was generated so far. With a `drafter` (models/speculative.py) the
        answer is decoded speculatively."""
        self.model, self.conv, self.drafter = model, conv, drafter
        self.prompt = conv.prompt_ids(user_text)
        if max_length is not None:
            room = max_length - len(self.prompt)
            if room < 1:
                conv.messages.pop()  # the turn never happened: the conversation stays usable
                raise LengthError(f"the conversation is {len(self.prompt)} tokens, --max-length is {max_length}: "
                                  "shorten the message or pass a larger --max-length")
            self.truncated = room < max_new_tokens
            max_new_tokens = min(max_new_tokens, room)
        else:
            self.truncated = False
        feed, position = conv.split(self.prompt)
        self.stream = TextStream(model.tokenizer)
        on_token = lambda t: on_text(self.stream.add(t))  # noqa: E731
        if drafter is not None:
            from .speculative import speculative_steps

            self.steps: Steps = speculative_steps(model.parts, drafter, self.prompt, position, max_new_tokens,
                                                  sampler, model.stop_ids, max_length or 1 << 30, on_token)
        else:
            self.steps = generation_steps(model.parts, feed, position, max_new_tokens, sampler, model.stop_ids,
                                          on_token=on_token)

    def finish(self, result: GenerationResult) -> TurnResult:
        text = self.stream.text
        self.conv.finish_turn(self.prompt, result.token_ids, result.stopped, text)
        return TurnResult(
            text=text, token_ids=result.token_ids, tokens_per_s=round(result.tokens_per_s, 3),
            prompt_tokens=len(self.prompt), model=self.model.spec.name,
            time_to_first_token_s=round(result.time_to_first_token_s, 4), new_tokens=len(result.token_ids),
            steps=result.steps, draft=self._draft_stats(result),
        )

    def _draft_stats(self, result: GenerationResult) -> dict[str, Any] | None:
        if self.drafter is None:
            return None
        from .speculative import draft_stats

        return draft_stats(result, self.drafter)
