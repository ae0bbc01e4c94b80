"""One peer id per live process (node/identity.py), with real processes: concurrent creation of the
default key, several `llmswarm bootstrap` with no --identity, an explicit key held twice, private
key files, restarts that keep their id, and a whole swarm started without --identity."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from llmswarm.bench.local_swarm import LocalSwarm, llmswarm_command
from llmswarm.node.errors import NodeError
from llmswarm.node.identity import IdentityInUse, acquire_identity, load_or_create_identity, peer_id_of

# Takes a key from the default folder, prints its peer id and path once every process of the batch
# has one (so all of them hold their keys at the same time), then exits.
TAKE_KEY = textwrap.dedent(
    """
    import os, sys, time
    from llmswarm.node.identity import acquire_identity
    ident = acquire_identity()
    print(ident.peer_id, ident.path, flush=True)
    open(os.path.join(sys.argv[1], str(os.getpid())), "w").close()
    deadline = time.monotonic() + 30
    while len(os.listdir(sys.argv[1])) < int(sys.argv[2]) and time.monotonic() < deadline:
        time.sleep(0.02)
    """
)


@pytest.fixture
def data_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "xdg"
    monkeypatch.setenv("XDG_DATA_HOME", str(home))
    return home / "llmswarm"


def test_concurrent_processes_get_distinct_ids_all_on_disk(data_home, tmp_path):
    n = 6
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", TAKE_KEY, str(barrier), str(n)], stdout=subprocess.PIPE,
                              text=True) for _ in range(n)]
    taken = [p.communicate(timeout=60)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    ids = {pid for pid, _ in taken}
    assert len(ids) == n, taken
    on_disk = {peer_id_of(load_or_create_identity(path)) for _, path in taken}
    assert on_disk == ids  # every id handed out is the one its key file holds
    keys = sorted(p.name for p in data_home.glob("*.key"))
    assert keys == sorted(["identity.key", *(f"identity-{i}.key" for i in range(1, n))])
    for key in data_home.glob("*.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_restart_takes_back_the_same_key(data_home):
    with acquire_identity() as first:
        with acquire_identity() as second:
            assert second.path.name == "identity-1.key" and second.peer_id != first.peer_id
        again = acquire_identity()  # the second process "restarts": the free key is its own again
        assert again.peer_id == second.peer_id
        again.close()
    with acquire_identity() as alone:
        assert alone.peer_id == first.peer_id


def test_explicit_key_held_by_another_holder_is_one_clear_error(tmp_path):
    key = tmp_path / "server.key"
    with acquire_identity(key):
        with pytest.raises(IdentityInUse, match="in use by another live llmswarm process"):
            acquire_identity(key)
    with acquire_identity(key):  # released with its holder
        pass


def test_key_readable_by_others_is_refused(tmp_path):
    key = tmp_path / "k.key"
    load_or_create_identity(key)
    os.chmod(key, 0o644)
    with pytest.raises(NodeError, match="readable by group or others .*chmod 600"):
        acquire_identity(key)


def _start_bootstrap(*args: str, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(llmswarm_command("bootstrap", "--port", "0", *args), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def test_two_bootstraps_without_identity_and_a_duplicate_explicit_one(data_home, tmp_path):
    env = {**os.environ, "XDG_DATA_HOME": str(data_home.parent)}
    procs = [_start_bootstrap(env=env) for _ in range(2)]
    try:
        addrs = [p.stdout.readline().strip() for p in procs]
        assert all(a.startswith("/ip4/127.0.0.1/tcp/") for a in addrs), addrs
        assert len({a.rsplit("/", 1)[1] for a in addrs}) == 2  # two peer ids
        # the same explicit key as a live bootstrap: refused with one line, exit code 4
        res = subprocess.run(llmswarm_command("bootstrap", "--port", "0", "--identity",
                                              str(data_home / "identity.key")),
                             capture_output=True, text=True, timeout=60, env=env)
        assert res.returncode == 4 and res.stdout == ""
        assert len(res.stderr.strip().splitlines()) == 1 and "in use by another live" in res.stderr
    finally:
        for p in procs:
            p.terminate()
            p.communicate(timeout=10)


@pytest.mark.slow
def test_swarm_without_identity_flags_chats_like_local(data_home, smollm2, tmp_path):
    prompt = ["--prompt", "What is the capital of France?", "--json", "--max-new-tokens", "12"]
    local = subprocess.run(llmswarm_command("chat", "--local", *prompt), capture_output=True, text=True, timeout=120)
    assert local.returncode == 0, local.stderr
    with LocalSwarm("smollm2-135m", [(0, 15), (15, 30)], announce_period_s=1.0, key_files=False) as swarm:
        ids = {r["peer_id"] for r in swarm.ready} | {swarm.peers[0].rsplit("/", 1)[1]}
        assert len(ids) == 3  # bootstrap and both servers: three peer ids from one default folder
        time.sleep(1.0)
        remote = subprocess.run(llmswarm_command("chat", "--peers", swarm.peers[0], *prompt),
                                capture_output=True, text=True, timeout=120)
        assert remote.returncode == 0, remote.stderr
        assert json.loads(remote.stdout)["token_ids"] == json.loads(local.stdout)["token_ids"]
    assert len(list(data_home.glob("*.key"))) == 3


@pytest.mark.slow
def test_one_key_in_two_places_is_detected_by_the_servers(tiny_llama, tmp_path):
    """A key file copied elsewhere (another machine, another folder) escapes the lock: the servers
    notice a newer record under their own peer id that they did not sign, and one of them stops with
    one line rather than share the id."""
    key = tmp_path / "a.key"
    boot = _start_bootstrap("--identity", str(tmp_path / "boot.key"), env=dict(os.environ))
    joins = []
    try:
        peers = boot.stdout.readline().strip()
        acquire_identity(key).close()  # create it
        (tmp_path / "b.key").write_bytes(key.read_bytes())
        (tmp_path / "b.key").chmod(0o600)
        for name in ("a.key", "b.key"):
            joins.append(subprocess.Popen(llmswarm_command(
                "join", "--model", str(tiny_llama), "--blocks", "0:6", "--peers", peers, "--identity",
                str(tmp_path / name), "--announce-period", "1", "--rebalance-period", "0"),
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and all(p.poll() is None for p in joins):
            time.sleep(0.5)
        stopped = [p for p in joins if p.poll() is not None]
        assert stopped, "both servers kept announcing one peer id"
        err = stopped[0].stderr.read()
        assert stopped[0].returncode == 4 and "another live process announces peer id" in err, err
    finally:
        for p in [*joins, boot]:
            if p.poll() is None:
                p.terminate()
            p.communicate(timeout=10)
