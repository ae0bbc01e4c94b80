"""Commands that cannot do their job say so in one line and exit non-zero, as a person runs them."""

from __future__ import annotations

import socket
import subprocess
import time

import pytest
from llmswarm.bench.local_swarm import llmswarm_command

UNREACHABLE = "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWFP6zzUNaVqzFqWZec55cY4jyFVmt6iWynFBwypiLHBBY"


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(llmswarm_command(*args), capture_output=True, text=True, timeout=timeout)


def one_line(res: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in res.stderr.splitlines() if ln.strip() and not ln.startswith("\r")]
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr and "unexpected" not in lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def bootstrap(tmp_path_factory):
    key = tmp_path_factory.mktemp("boot") / "boot.key"
    proc = subprocess.Popen(llmswarm_command("bootstrap", "--port", "0", "--identity", str(key)),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        yield proc.stdout.readline().strip()
    finally:
        proc.terminate()
        proc.communicate(timeout=10)


def test_malformed_peers_are_named_at_once():
    started = time.monotonic()
    res = cli("chat", "--peers", "garbage", "-p", "hi")
    assert res.returncode == 2 and "'garbage'" in one_line(res) and time.monotonic() - started < 60


@pytest.mark.slow
def test_unreachable_bootstrap_is_an_error_for_chat_and_status(smollm2):
    for args in (("chat", "-p", "hi", "-n", "2"), ("status", "--once")):
        res = cli(*args, "--peers", UNREACHABLE)
        assert res.returncode == 4 and "could not reach any bootstrap peer" in one_line(res)


@pytest.mark.slow
def test_join_with_a_span_outside_the_model_exits_2(bootstrap, smollm2):
    for args, words in ((("--blocks", "0:999"), "outside smollm2-135m's blocks 0:30"),
                        (("--num-blocks", "999"), "between 1 and 30")):
        res = cli("join", *args, "--peers", bootstrap)
        assert res.returncode == 2 and words in one_line(res)


def test_a_port_in_use_or_an_address_not_here_is_refused():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        res = cli("bootstrap", "--port", str(port))
        assert res.returncode == 4 and f"port {port} on 127.0.0.1 is already in use" in one_line(res)
    res = cli("bootstrap", "--host", "10.1.2.3")
    assert res.returncode == 4 and "10.1.2.3 is not an address of this machine" in one_line(res)


def test_simulated_swarm_size_is_bounded():
    res = cli("route", "--simulate", "100000000x80")
    assert res.returncode == 4 and "at most 20000 servers" in one_line(res)
