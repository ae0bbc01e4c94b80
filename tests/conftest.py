"""Shared fixtures: tiny random checkpoints made on the spot (saved sharded), and the built-in model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from llmswarm.models.checkpoint import Checkpoint
from llmswarm.models.span import load_span
from llmswarm.node import config
from llmswarm.node.dataplane import DataPlane
from llmswarm.node.host import open_host
from llmswarm.node.server.span_server import SpanServer
from llmswarm.routing import Hop

MODEL = "tiny"  # the model name the in-process servers announce


def _save(model, folder: Path) -> Path:
    model.save_pretrained(str(folder), max_shard_size="200KB", safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    )
    model = LlamaForCausalLM(cfg).eval()
    return _save(model, tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_bloom(tmp_path_factory) -> Path:
    from transformers import BloomConfig, BloomForCausalLM

    torch.manual_seed(0)
    cfg = BloomConfig(vocab_size=512, hidden_size=64, n_layer=6, n_head=4)
    model = BloomForCausalLM(cfg).eval()
    return _save(model, tmp_path_factory.mktemp("tiny-bloom"))


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The built-in model's converted folder (converted once into the user's cache)."""
    from llmswarm.models.builtin import ensure_builtin
    from llmswarm.models.registry import resolve

    return ensure_builtin(resolve("smollm2-135m"))


# --------------------------------------------------------------------------------------------------
# Parallel runs (pytest-xdist, `-n auto` in pyproject): most end-to-end time is spent waiting on
# real processes, so two workers on two cores halve the suite. Tests that share a costly fixture
# run on one worker (one shared swarm, not one per worker), and so do each module's tests (a
# module-scoped swarm, and tests that build on the one before); the WAN beds run one at a time, since
# each emulates links in a user-space switch whose timing a second bed would disturb.
# --------------------------------------------------------------------------------------------------
def pytest_xdist_auto_num_workers(config) -> int:
    return max(1, min(os.cpu_count() or 1, 4))  # each worker may start a 4-process swarm: cap the memory


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if "swarm3" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("swarm3"))
        elif item.path.name.startswith("test_netbed"):
            item.add_marker(pytest.mark.xdist_group("netbed"))
        else:  # a module's tests stay together: its module-scoped swarm starts once, in test order
            item.add_marker(pytest.mark.xdist_group(item.path.name))


@pytest.fixture(autouse=True, scope="session")
def _threads():
    # Two cores: keep torch from oversubscribing when tests start subprocesses.
    torch.set_num_threads(int(os.environ.get("LLMSWARM_TEST_THREADS", "2")))


# --------------------------------------------------------------------------------------------------
# In-process swarm: real libp2p hosts on 127.0.0.1, one SpanServer each, and a client host. (The
# process-level swarm, with real `llmswarm` processes, is llmswarm.bench.local_swarm.LocalSwarm.)
# --------------------------------------------------------------------------------------------------
class Swarm:
    """N server hosts, each serving one span, and one client host connected to all of them."""

    def __init__(self, spans, servers, hosts, client, nursery):
        self.spans, self.servers, self.hosts, self.client, self.nursery = spans, servers, hosts, client, nursery

    def chain(self, *indices: int) -> list[Hop]:
        return [Hop(self.hosts[i].peer_id, self.spans[i].start, self.spans[i].end) for i in indices]


def run_host_swarm(folder, bounds, fn, direct=False, **server_kw):
    """Servers for spans `bounds` [(a, b), ...] of the tiny checkpoint; fn(swarm, local_span).
    `direct`: each server also runs a data plane (node/dataplane.py), as `join` does by default."""
    ckpt = Checkpoint.open(folder)
    whole = load_span(ckpt, 0, ckpt.config.num_blocks, torch.float32)
    spans = [load_span(ckpt, a, b, torch.float32) for a, b in bounds]

    async def main():
        async with trio.open_nursery() as nursery:
            hosts, servers, scopes = [], [], []

            async def next_hop(peer_id, block):  # what a server's directory would say (a record per host)
                for h, s in zip(hosts, spans, strict=False):
                    if h.peer_id == peer_id and s.start <= block < s.end:
                        return h.addrs
                return None

            for span in spans:
                scope = trio.CancelScope()
                started = trio.Event()

                async def serve(span=span, scope=scope, started=started):
                    with scope:
                        async with open_host(port=0, key_pair=create_new_key_pair()) as host, \
                                trio.open_nursery() as inner:
                            server = SpanServer(MODEL, span, host=host, next_hop=next_hop, **server_kw)
                            if direct:
                                host.dataplane = DataPlane("127.0.0.1")
                                await inner.start(host.dataplane.serve)
                            inner.start_soon(server.run)
                            host.set_handler(config.PROTOCOL_INFERENCE, server.handle)
                            hosts.append(host)
                            servers.append(server)
                            started.set()
                            await trio.sleep_forever()

                nursery.start_soon(serve)
                await started.wait()
                scopes.append(scope)
            async with open_host(port=0, key_pair=create_new_key_pair()) as client:
                for h in hosts:
                    await client.connect(h.addrs[0])
                swarm = Swarm(spans, servers, hosts, client, nursery)
                swarm.stop = lambda i: scopes[i].cancel()  # the server's host goes away, streams reset
                with trio.fail_after(60):
                    await fn(swarm, whole)
            nursery.cancel_scope.cancel()

    trio.run(main)




@pytest.fixture
def host_swarm():
    """run(folder, [(a, b), ...], fn, **server_kw): fn(swarm, whole_span) inside a running swarm."""
    return run_host_swarm


# --------------------------------------------------------------------------------------------------
# One swarm of real processes (bootstrap + 3 servers of the built-in model) shared by the end-to-end
# modules that only talk to it (chat, api, fuzz): starting one takes ~20 s on 2 cores. Modules that
# kill or move servers start their own.
# --------------------------------------------------------------------------------------------------
E2E_PROMPT = "What is the capital of France?"


@pytest.fixture(scope="session")
def swarm3(smollm2):
    from llmswarm.bench.local_swarm import LocalSwarm

    # Announcing every 3 s, not 1: the swarm idles beside the whole suite (13% of a core at 1 s, 5% at 3 s)
    with LocalSwarm("smollm2-135m", [(0, 10), (10, 20), (20, 30)], announce_period_s=3.0) as s:
        yield s


@pytest.fixture(scope="session")
def local_answer(smollm2) -> dict:
    """`chat --local` on E2E_PROMPT, 24 new tokens: the answer every swarm path must reproduce."""
    import json
    import subprocess

    from llmswarm.bench.local_swarm import llmswarm_command

    res = subprocess.run(llmswarm_command("chat", "--local", "--prompt", E2E_PROMPT, "--json", "-n", "24"),
                         capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)
