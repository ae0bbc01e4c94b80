"""`llmswarm api` end to end: a real 3-server swarm, a real `llmswarm api` process, the official
`openai` client, raw HTTP for every error status, headless Chromium for the page."""

from __future__ import annotations

import shutil
import subprocess
import time

import httpx
import pytest
from llmswarm.bench.local_swarm import LocalSwarm

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m"
KEY = "test-key"
PROMPT = "What is the capital of France?"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def swarm(swarm3):
    """The session's shared swarm (conftest.py) with an `llmswarm api` process on it for this module."""
    swarm3.api = swarm3.start_api("--api-key", KEY, "--max-concurrent", "2", "--max-length", "512")
    yield swarm3
    api = swarm3.clients.pop()
    api.terminate()
    api.wait(timeout=10)


@pytest.fixture(scope="module")
def local(local_answer) -> dict:
    return local_answer


@pytest.fixture(scope="module")
def client(swarm):
    from openai import OpenAI

    return OpenAI(base_url=swarm.api + "/v1", api_key=KEY, max_retries=0, timeout=120)


def ask(client, **kw):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPT}],
                                          temperature=0, max_tokens=24, **kw)


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_greedy_chat_equals_chat_local(client, local):
    res = ask(client)
    assert res.choices[0].message.content == local["text"] and "Paris" in local["text"]
    assert res.choices[0].finish_reason == ("stop" if local["new_tokens"] < 24 else "length")
    assert (res.usage.prompt_tokens, res.usage.completion_tokens) == (local["prompt_tokens"], local["new_tokens"])


def test_streamed_chat_equals_chat_local(client, local):
    chunks = list(ask(client, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == local["text"]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens == local["new_tokens"]


def test_concurrent_requests_each_equal_chat_local(swarm, local):
    """Requests share one process (and the servers batch them): each answer is still the local one.
    (Two at once: --max-concurrent is 2 here.) Their generation loops interleave on one thread."""
    from concurrent.futures import ThreadPoolExecutor

    from openai import OpenAI

    clients = [OpenAI(base_url=swarm.api + "/v1", api_key=KEY, max_retries=0, timeout=120) for _ in range(2)]
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda c: ask(c).choices[0].message.content, clients))
    assert answers == [local["text"]] * 2


def test_concurrent_requests_share_head_calls_and_keep_their_answers(swarm3, local):
    """Four requests at once on an endpoint that takes four (a chat and three different completions):
    their heads ran batched (a head call for more than one request), and each answer is the one it gets
    alone (the chat's is `chat --local`'s): batching changes no token."""
    from concurrent.futures import ThreadPoolExecutor

    from openai import OpenAI

    url = swarm3.start_api("--max-concurrent", "4")
    try:
        clients = [OpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=120) for _ in range(4)]
        prompts = ["The sky is", "Once upon a time", "def fibonacci(n):"]

        def answer(i: int) -> str:
            if i == 0:
                return ask(clients[0]).choices[0].message.content
            res = clients[i].completions.create(model=MODEL, prompt=prompts[i - 1], max_tokens=24, temperature=0)
            return res.choices[0].text

        alone = [answer(i) for i in range(4)]
        before = httpx.get(url + "/v1/swarm", timeout=60).json()["api"]
        assert before["largest_head_batch"] == 1 and before["head_rows"] == before["head_batches"]
        with ThreadPoolExecutor(4) as pool:
            together = list(pool.map(answer, range(4)))
        after = httpx.get(url + "/v1/swarm", timeout=60).json()["api"]
    finally:
        api = swarm3.clients.pop()
        api.terminate()
        api.wait(timeout=10)
    assert alone[0] == local["text"] and len(set(alone)) == 4
    assert together == alone
    assert after["largest_head_batch"] >= 2, after
    assert after["head_rows"] - before["head_rows"] > after["head_batches"] - before["head_batches"], (before, after)


def test_a_draft_model_checks_several_tokens_per_step_and_changes_no_answer(swarm3, local):
    """`api --draft` (the target itself as its draft: every draft stands): two requests at once, each
    with its own draft cache, answer what `chat --local` answers, in fewer swarm steps than tokens."""
    from concurrent.futures import ThreadPoolExecutor

    from openai import OpenAI

    url = swarm3.start_api("--max-concurrent", "2", "--draft", MODEL, "--draft-tokens", "4")
    try:
        clients = [OpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=120) for _ in range(2)]
        with ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(lambda c: ask(c).choices[0].message.content, clients))
        stats = httpx.get(url + "/v1/swarm", timeout=60).json()["api"]["draft"]
        stopped = ask(clients[0], stop=["Paris"]).choices[0].message.content
        after = httpx.get(url + "/v1/swarm", timeout=60).json()["api"]["draft"]
    finally:
        api = swarm3.clients.pop()
        api.terminate()
        api.wait(timeout=10)
    assert answers == [local["text"]] * 2
    assert stats["model"] == MODEL and stats["drafted"] >= 2 * (local["new_tokens"] // 2)
    assert stats["accepted"] == stats["drafted"] and stats["acceptance_rate"] == 1.0
    assert stopped == local["text"].split("Paris")[0]
    assert after["drafted"] > stats["drafted"]  # an answer a stop string ended counts its drafts too


def test_stop_string_ends_the_answer_before_it(client, local):
    res = ask(client, stop=["Paris"])
    assert res.choices[0].message.content == local["text"].split("Paris")[0]
    assert res.choices[0].finish_reason == "stop"


def test_completions_streamed_and_not_agree_and_seed_repeats(client):
    whole = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=8, temperature=0)
    parts = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in parts) == whole.choices[0].text != ""
    assert whole.usage.completion_tokens == 8 and whole.choices[0].finish_reason == "length"
    sampled = [client.completions.create(model=MODEL, prompt="The sky is", max_tokens=8, temperature=1.0,
                                         top_p=0.9, seed=7).choices[0].text for _ in range(2)]
    assert sampled[0] == sampled[1]


@pytest.mark.parametrize("body, param", [
    ({"model": "gpt-4", "prompt": "hi"}, "model"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": -5}, "max_tokens"),
    ({"model": MODEL, "prompt": "hi", "temperature": 3}, "temperature"),
    ({"model": MODEL, "prompt": "word " * 600}, "prompt"),  # past --max-length 512
])
def test_bad_parameters_are_400_with_the_param_named(swarm, body, param):
    r = httpx.post(swarm.api + "/v1/completions", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and r.json()["error"]["type"] == "invalid_request_error"


def test_malformed_json_is_400_and_missing_key_is_401(swarm):
    r = httpx.post(swarm.api + "/v1/chat/completions", content=b"{not json", headers=AUTH, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(swarm.api + "/v1/chat/completions", json={"model": MODEL, "messages": []}, timeout=60)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.get(swarm.api + "/v1/models", headers={"Authorization": "Bearer wrong"}, timeout=60)
    assert r.status_code == 401
    assert httpx.get(swarm.api + "/v1/swarm", timeout=60).status_code == 200  # the page's data stays open


def test_no_route_is_503_with_retry_after(smollm2):
    with LocalSwarm(MODEL, []) as empty:  # a bootstrap peer and no server
        url = empty.start_api()
        r = httpx.post(url + "/v1/chat/completions", timeout=60,
                       json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True})
    assert r.status_code == 503 and int(r.headers["retry-after"]) > 0
    assert r.json()["error"]["code"] == "no_route" and "llmswarm join" in r.json()["error"]["message"]


def _servers(swarm) -> dict[str, tuple[int, int]]:
    rows = httpx.get(swarm.api + "/v1/swarm", timeout=60).json()["servers"]
    return {r["public_name"]: (r["cache_tokens_left"], r["sessions"]) for r in rows}


def _wait_for(swarm, ok, what: str, deadline_s: float = 60.0) -> dict:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if ok(rows := _servers(swarm)):
            return rows
        time.sleep(0.5)
    raise AssertionError(f"{what}: servers say {rows}")


def test_429_past_max_concurrent_and_hanging_up_frees_every_server(swarm):
    """Two streams hold both slots (and pages on every server); a third is refused; both clients
    hang up mid-stream and every server's cache comes back to full."""
    full = _wait_for(swarm, lambda rows: len(rows) == 3 and all(s == 0 for _, s in rows.values()), "idle swarm")
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 400, "temperature": 0, "stream": True}
    with httpx.Client(base_url=swarm.api, headers=AUTH, timeout=120) as http:
        with http.stream("POST", "/v1/completions", json=body) as a, \
                http.stream("POST", "/v1/completions", json=body) as b:
            lines = [a.iter_lines(), b.iter_lines()]
            assert all(next(it).startswith("data: ") for it in lines)  # both are streaming
            r = httpx.post(swarm.api + "/v1/completions", json=body, headers=AUTH, timeout=60)
            assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
            _wait_for(swarm, lambda rows: all(s == 2 and c < full[n][0] for n, (c, s) in rows.items()),
                      "two sessions holding pages on every server")
    _wait_for(swarm, lambda rows: rows == full, "every page back after the hang-ups")


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's `chromium` is not installed")
def test_page_in_headless_chromium_shows_every_server(swarm, tmp_path):
    _wait_for(swarm, lambda rows: len(rows) == 3, "three servers in the snapshot")
    flags = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--window-size=1400,600", "--virtual-time-budget=5000"]
    shot = tmp_path / "page.png"
    subprocess.run([*flags, f"--screenshot={shot}", swarm.api + "/"], capture_output=True, timeout=120)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    dom = subprocess.run([*flags, "--dump-dom", swarm.api + "/"], capture_output=True, text=True, timeout=120).stdout
    assert all(f">server{i}</td>" in dom for i in range(3)), dom[-2000:]
    assert "covered: can serve" in dom and "tokens/s" in dom
