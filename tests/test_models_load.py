"""Checkpoints: spans read only their own tensors; names and paths fail with clear errors."""

from __future__ import annotations

import time

import llmswarm.models.checkpoint as checkpoint_mod
import pytest
import torch
from llmswarm.models.checkpoint import Checkpoint
from llmswarm.models.errors import CheckpointError, UnknownModelError
from llmswarm.models.registry import REGISTRY, resolve
from llmswarm.models.span import load_span


class _SpyOpen:
    """Records every tensor read through safe_open."""

    def __init__(self, real):
        self.real, self.read, self.files = real, [], set()

    def __call__(self, path, *a, **k):
        spy = self
        self.files.add(path.rsplit("/", 1)[-1])
        handle = self.real(path, *a, **k)

        class Handle:
            def __enter__(self):
                self.h = handle.__enter__()
                return self

            def __exit__(self, *exc):
                return handle.__exit__(*exc)

            def get_tensor(self, key):
                spy.read.append(key)
                return self.h.get_tensor(key)

        return Handle()


@pytest.mark.parametrize("fixture,prefix", [("tiny_llama", "model.layers."), ("tiny_bloom", "transformer.h.")])
def test_span_reads_only_its_blocks(request, monkeypatch, fixture, prefix):
    from transformers import AutoModelForCausalLM

    folder = request.getfixturevalue(fixture)
    ckpt = Checkpoint.open(folder)
    assert len(set(ckpt.weight_map.values())) > 2, "fixture should be sharded"
    spy = _SpyOpen(checkpoint_mod.safe_open)
    monkeypatch.setattr(checkpoint_mod, "safe_open", spy)

    span = load_span(ckpt, 2, 4, torch.float32, layout=False)  # the checkpoint's own tensors, not re-laid

    assert spy.read and all(k.startswith((f"{prefix}2.", f"{prefix}3.")) for k in spy.read)
    assert spy.files == ckpt.files_for(spy.read)
    # exactly those blocks' parameters, equal to the reference model's
    ref = AutoModelForCausalLM.from_pretrained(str(folder)).state_dict()
    ours = span.blocks.state_dict()
    expected = {k: v for k, v in ref.items() if k.startswith((f"{prefix}2.", f"{prefix}3."))}
    assert len(ours) == len(expected)
    for key, value in expected.items():
        rest = key[len(prefix):]
        local = f"{int(rest.split('.')[0]) - 2}.{rest.split('.', 1)[1]}"
        torch.testing.assert_close(ours[local], value, rtol=0, atol=0)


def test_unknown_model_lists_known_names():
    with pytest.raises(UnknownModelError) as e:
        resolve("gpt-17")
    assert "smollm2-135m" in str(e.value) and "bloom-176b" in str(e.value)


def test_registry_has_the_names_users_type():
    for name in ("bloom-176b", "bloom-560m", "llama-3.1-8b", "llama-3.1-70b", "mistral-7b", "qwen2.5-7b",
                 "smollm2-135m"):
        assert name in REGISTRY
    assert REGISTRY["bloom-176b"].hub_id == "bigscience/bloom" and REGISTRY["bloom-176b"].num_blocks == 70


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        Checkpoint.open(tmp_path / "nope")
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(CheckpointError):
        Checkpoint.open(tmp_path)


def test_span_outside_model_is_refused(tiny_llama):
    with pytest.raises(CheckpointError, match="outside"):
        load_span(Checkpoint.open(tiny_llama), 4, 9, torch.float32)


def test_hub_unreachable_fails_fast(monkeypatch, tmp_path):
    """Offline, a hub model fails in seconds with one line naming the fix."""
    import time

    from llmswarm.models.fetch import download_from_hub

    monkeypatch.setenv("LLMSWARM_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    started = time.monotonic()
    with pytest.raises(CheckpointError, match="cannot reach the Hugging Face hub|not found"):
        download_from_hub("bigscience/bloom-560m")
    assert time.monotonic() - started < 60


def _copy_linked(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).symlink_to(f)
    return dst


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_damaged_shard_is_a_checkpoint_error(tiny_llama, tmp_path, damage):
    folder = _copy_linked(tiny_llama, tmp_path / "model")
    ckpt = Checkpoint.open(folder)
    shard = folder / ckpt.weight_map["model.layers.0.self_attn.q_proj.weight"]
    data = shard.read_bytes()
    shard.unlink()
    if damage == "truncated":
        shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="missing" if damage == "missing" else "corrupt or truncated"):
        load_span(ckpt, 0, 2, torch.float32)


def test_chat_local_on_a_corrupt_shard_exits_3(smollm2, tmp_path):
    """What a person sees: one line and exit code 3, not "unexpected SafetensorError"."""
    import subprocess

    from llmswarm.bench.local_swarm import llmswarm_command

    folder = _copy_linked(smollm2, tmp_path / "model")
    shard = folder / Checkpoint.open(folder).weight_map["model.embed_tokens.weight"]
    data = shard.read_bytes()
    shard.unlink()
    shard.write_bytes(data[:4096])
    out = subprocess.run(llmswarm_command("chat", "--local", "--model", str(folder), "-p", "hi", "-n", "2"),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 3, out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "corrupt or truncated" in lines[0] and "unexpected" not in lines[0]


def test_concurrent_conversions_convert_once(tmp_path, monkeypatch):
    """Two processes starting on a fresh machine: one converts, the other waits and reuses it."""
    import threading

    from llmswarm.models import builtin

    calls = []

    def slow_convert(gguf, target, progress):
        calls.append(target)
        time.sleep(0.3)
        target.mkdir()
        (target / builtin.DONE_MARKER).write_text("{}")
        return target

    monkeypatch.setattr(builtin, "_convert", slow_convert)
    waited = []
    target = tmp_path / "models" / "m"
    threads = [threading.Thread(target=builtin.convert_gguf,
                                args=(tmp_path / "x.gguf", target, lambda task, *a: waited.append(task)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [target] and (target / builtin.DONE_MARKER).exists()
    assert any("waiting for another process" in w for w in waited)
