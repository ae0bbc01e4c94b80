"""Shared fixtures: tiny random checkpoints made on the spot (saved sharded), and the built-in model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch


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


@pytest.fixture(autouse=True, scope="session")
def _threads():
    # Two cores: keep torch from oversubscribing when tests start subprocesses.
    torch.set_num_threads(int(os.environ.get("LLMSWARM_TEST_THREADS", "2")))
