"""`llmswarm status`: the health collector, the snapshot builder, and the live TUI in a real
terminal (tmux) against a real two-server swarm."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import uuid

import pytest
from llmswarm.bench.local_swarm import LocalSwarm, llmswarm_command
from llmswarm.node import config
from llmswarm.node.discovery.records import ServerRecord
from llmswarm.node.discovery.status import build_status
from llmswarm.node.server.health import HealthCollector, gpu_indices

MODEL = "smollm2-135m"


# -- fast ------------------------------------------------------------------------------------------
def test_health_without_gpu_reports_cpu_and_says_so():
    h = HealthCollector("cpu").collect(sessions=2, tokens_served=10, cache_tokens_in_use=64)
    assert h["gpu"] == "cpu device" and "gpus" not in h
    assert 0 <= h["cpu_percent"] <= 100 * (os.cpu_count() or 1)
    assert 0 < h["ram_used_mb"] <= h["ram_total_mb"]
    assert (h["sessions"], h["tokens_served"], h["cache_tokens_in_use"]) == (2, 10, 64)
    assert len(json.dumps(h)) < config.MAX_RECORD_HEALTH_BYTES
    assert gpu_indices("cuda:1") == [1] and gpu_indices("cuda") == [0] and gpu_indices("cpu") == []


def test_health_on_cuda_without_nvml_gpu_never_crashes():
    h = HealthCollector("cuda:7").collect()  # no GPU here (or not that one): CPU figures only
    assert "cpu_percent" in h and isinstance(h["gpu"], str) and h["gpu"]
    assert not h.get("gpus") or all("name" in g for g in h["gpus"])


def _rec(name: str, start: int, end: int, **kw) -> ServerRecord:
    kw = {"num_blocks": 30, "inference_rps": 5.0, **kw}
    return ServerRecord(peer_id=f"peer-{name}", model=MODEL, start=start, end=end, addrs=[],
                        public_name=name, throughput=2.0, expires_at=time.time() + 60, **kw)


def test_build_status_coverage_and_gaps():
    poison = [_rec("d", 0, 31, num_blocks=31), _rec("e", 20, 30, inference_rps=0.0)]  # valid signatures, bad sense
    snap = build_status([_rec("a", 0, 10), _rec("b", 5, 20), _rec("c", 20, 30, state="offline"), *poison],
                        {"peer-a": 0.001})
    (m,) = snap["models"]
    assert m["name"] == MODEL and m["num_blocks"] == 30 and not m["covered"] and m["gaps"] == [[20, 30]]
    assert m["servers_per_block"][:12] == [1] * 5 + [2] * 5 + [1, 1] and m["servers_per_block"][25] == 0
    assert m["throughput_per_block"][7] == 4.0 and m["servers"] == 2
    assert m["dropped_records"] == {"model size": 1, "no speed": 1}
    rows = {s["public_name"]: s for s in snap["servers"]}
    assert rows["a"]["rtt_s"] == 0.001 and rows["b"]["rtt_s"] is None and rows["c"]["state"] == "offline"
    assert {"public_name", "peer_id", "model", "start", "end", "state", "throughput", "rtt_s", "cache_tokens_left",
            "sessions", "health", "version"} <= set(rows["a"])
    json.dumps(snap)
    assert build_status([_rec("a", 0, 30)], {}, num_blocks={"other": 4})["models"][0]["name"] == "other"


# -- end to end ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def swarm(smollm2):
    with LocalSwarm(MODEL, [(0, 15), (15, 30)], announce_period_s=1.0) as s:
        yield s


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(llmswarm_command(*args), capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_status_json_structure(swarm):
    res = cli("status", "--peers", swarm.peers[0], "--model", MODEL, "--json")
    assert res.returncode == 0, res.stderr
    snap = json.loads(res.stdout)
    (m,) = snap["models"]
    assert (m["name"], m["num_blocks"], m["covered"], m["gaps"]) == (MODEL, 30, True, [])
    assert m["servers_per_block"] == [1] * 30 and all(t > 0 for t in m["throughput_per_block"])
    rows = sorted(snap["servers"], key=lambda s: s["start"])
    assert [(s["public_name"], s["start"], s["end"], s["state"]) for s in rows] == [
        ("server0", 0, 15, "online"), ("server1", 15, 30, "online")]
    for s in rows:
        assert 0 < s["rtt_s"] < 1.0 and s["throughput"] > 0 and s["version"]
        assert s["health"]["gpu"] == "cpu device" and "cpu_percent" in s["health"]
        assert s["health"]["sessions"] == 0 and "tokens_served" in s["health"]
    res = cli("status", "--peers", swarm.peers[0], "--once")
    assert res.returncode == 0 and "server0" in res.stdout and "can serve" in res.stdout, res.stderr


class Tmux:
    def __init__(self) -> None:
        self.socket = f"llmswarm-test-{uuid.uuid4().hex[:8]}"

    def __call__(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True, text=True,
                              check=True, timeout=10).stdout

    def screen(self) -> str:
        return self("capture-pane", "-p", "-t", "status")

    def wait_for(self, check, timeout_s: float, what: str) -> str:
        deadline = time.monotonic() + timeout_s
        screen = ""
        while time.monotonic() < deadline:
            screen = self.screen()
            if check(screen):
                return screen
            time.sleep(0.5)
        raise AssertionError(f"screen never showed {what} within {timeout_s} s:\n{screen}")


def _row(screen: str, name: str) -> str:
    return next((line for line in screen.splitlines() if f" {name} " in f" {line} "), "")


def _gone(screen: str, name: str) -> bool:
    row = _row(screen, name)
    return not row or "gone" in row or "offline" in row


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
def test_status_tui_in_tmux_sees_a_server_die(swarm):
    tmux = Tmux()
    # The pane starts 80 wide and is then resized; without COLUMNS rich asks the tty for its width.
    cmd = " ".join(["env", "-u", "COLUMNS", "-u", "LINES",
                    *llmswarm_command("status", "--peers", swarm.peers[0], "--interval", "1")])
    tmux("new-session", "-d", "-s", "status", "-x", "160", "-y", "40", f"{cmd}; echo STATUS-EXITED $?; sleep 30")
    try:
        screen = tmux.wait_for(lambda s: "server0" in s and "server1" in s and "can serve" in s, 60,
                               "both servers")
        assert "online" in _row(screen, "server0") and "online" in _row(screen, "server1")
        os.kill(swarm.servers[1].pid, signal.SIGKILL)  # no "offline" announcement: only expiry tells
        swarm.servers[1].wait(timeout=10)
        killed_at = time.monotonic()
        expiry_s = swarm.announce_period_s * config.RECORD_TTL_FACTOR
        screen = tmux.wait_for(
            lambda s: "broken" in s and _gone(s, "server1"), expiry_s + 8, "server1 gone and the model broken")
        assert time.monotonic() - killed_at < expiry_s + 8
        assert "online" in _row(screen, "server0") and "15:30" in screen, screen
        print("\n--- status screen after SIGKILL of server1 ---\n" + screen)
        tmux("send-keys", "-t", "status", "q")
        tmux.wait_for(lambda s: "STATUS-EXITED 0" in s, 10, "status quit on q")
        res = cli("status", "--peers", swarm.peers[0], "--model", MODEL, "--json")
        assert res.returncode == 4 and "15:30" in res.stderr, res.stderr
        assert json.loads(res.stdout)["models"][0]["gaps"] == [[15, 30]]
    finally:
        subprocess.run(["tmux", "-L", tmux.socket, "kill-server"], capture_output=True, timeout=10)
