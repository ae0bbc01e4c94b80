"""The OpenAI shapes of `llmswarm api` without a network: request validation, stop strings, chunks."""

from __future__ import annotations

import pytest
from llmswarm.node.api.protocol import ApiError, Reply, StopText, Usage, parse_request

NAMES = {"smollm2-135m"}


def parse(body, chat=True):
    return parse_request(body, chat, NAMES)


def test_a_valid_chat_request_keeps_its_parameters():
    req = parse({"model": "smollm2-135m", "messages": [{"role": "developer", "content": "be brief"},
                                                      {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                 "max_completion_tokens": 7, "temperature": 0, "top_p": 0.5, "stop": "\n", "seed": 3,
                 "stream": True, "stream_options": {"include_usage": True}, "user": "ignored"})
    assert req.messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert (req.max_tokens, req.temperature, req.top_p, req.stop, req.seed) == (7, 0.0, 0.5, ("\n",), 3)
    assert req.stream and req.include_usage


@pytest.mark.parametrize("body, param", [
    ({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}, "model"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "model"),
    ({"model": "smollm2-135m", "messages": []}, "messages"),
    ({"model": "smollm2-135m", "messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ({"model": "smollm2-135m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content"),
    ({"model": "smollm2-135m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}, "max_tokens"),
    ({"model": "smollm2-135m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2.5}, "max_tokens"),
    ({"model": "smollm2-135m", "messages": [{"role": "user", "content": "hi"}], "top_p": 1.5}, "top_p"),
    ({"model": "smollm2-135m", "messages": [{"role": "user", "content": "hi"}], "n": 3}, "n"),
    ({"model": "smollm2-135m", "messages": [{"role": "user", "content": "hi"}], "stop": ["a"] * 5}, "stop"),
    ({"model": "smollm2-135m", "messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, "stream"),
])
def test_bad_chat_requests_name_the_parameter(body, param):
    with pytest.raises(ApiError) as e:
        parse(body)
    assert e.value.status == 400 and e.value.param == param
    assert e.value.body()["error"]["type"] == "invalid_request_error"


def test_completions_take_a_string_or_one_element_list():
    assert parse({"model": "smollm2-135m", "prompt": ["abc"]}, chat=False).prompt == "abc"
    with pytest.raises(ApiError):
        parse({"model": "smollm2-135m", "prompt": ["a", "b"]}, chat=False)
    with pytest.raises(ApiError):
        parse([1, 2], chat=False)


def test_stop_text_never_shows_a_stop_string_split_across_pieces():
    stop = StopText(("END", "\n\n"))
    shown = "".join(stop.feed(p) for p in ["Hello E", "N", "ough. E", "ND more"])
    assert shown == "Hello ENough. " and stop.stopped
    assert stop.feed("after") == ""
    free = StopText(())
    assert "".join(free.feed(p) for p in ["a", "b"]) + free.flush() == "ab"
    held = StopText(("xyz",))
    assert held.feed("abcx") == "ab" and held.flush() == "cx"


def test_chunks_and_bodies_have_the_openai_shapes():
    chat = Reply(parse({"model": "smollm2-135m", "messages": [{"role": "user", "content": "hi"}]}))
    first, last = chat.chunk("Hi", first=True), chat.chunk(None, "stop")
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"] == {"role": "assistant",
                                                                                            "content": "Hi"}
    assert last["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    assert first["id"] == last["id"] and first["id"].startswith("chatcmpl-")
    whole = chat.whole("Hi", "length", Usage(5, 2))
    assert whole["usage"] == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    text = Reply(parse({"model": "smollm2-135m", "prompt": "x"}, chat=False))
    assert text.chunk("a")["object"] == "text_completion" and text.chunk("a")["choices"][0]["text"] == "a"
    assert ApiError(503, "down", retry_after_s=10).headers() == {"Retry-After": "10"}
