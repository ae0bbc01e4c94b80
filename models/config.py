"""Architecture description of a checkpoint, read from its Hugging Face `config.json`.

One dataclass for every family, so the rest of llmswarm never reads raw config dicts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CheckpointError

# model_type values of Llama-style decoders that our Llama family runs unchanged.
LLAMA_LIKE = {"llama", "mistral", "qwen2", "smollm", "smollm2", "granite_llama"}
BLOOM_LIKE = {"bloom"}


@dataclass(frozen=True)
class ModelConfig:
    family: str  # "llama" | "bloom"
    model_type: str
    num_blocks: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    norm_eps: float
    tie_word_embeddings: bool
    max_position_embeddings: int
    attention_bias: bool = False  # q/k/v biases (Qwen2)
    mlp_bias: bool = False
    rope: dict[str, Any] = field(default_factory=dict)  # rope_type, rope_theta and scaling params
    residual_post_layernorm: bool = False  # BLOOM's apply_residual_connection_post_layernorm
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        model_type = str(d.get("model_type", ""))
        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if isinstance(eos, int) else ())
        if model_type in LLAMA_LIKE:
            heads = int(d["num_attention_heads"])
            hidden = int(d["hidden_size"])
            return cls(
                family="llama",
                model_type=model_type,
                num_blocks=int(d["num_hidden_layers"]),
                hidden_size=hidden,
                num_heads=heads,
                num_kv_heads=int(d.get("num_key_value_heads") or heads),
                head_dim=int(d.get("head_dim") or hidden // heads),
                intermediate_size=int(d["intermediate_size"]),
                vocab_size=int(d["vocab_size"]),
                norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
                attention_bias=bool(d.get("attention_bias", model_type == "qwen2")),
                mlp_bias=bool(d.get("mlp_bias", False)),
                rope=_rope_params(d),
                bos_token_id=d.get("bos_token_id"),
                eos_token_ids=eos_ids,
            )
        if model_type in BLOOM_LIKE:
            hidden = int(d.get("hidden_size") or d.get("n_embed"))
            heads = int(d.get("n_head") or d.get("num_attention_heads"))
            return cls(
                family="bloom",
                model_type=model_type,
                num_blocks=int(d.get("n_layer") or d.get("num_hidden_layers")),
                hidden_size=hidden,
                num_heads=heads,
                num_kv_heads=heads,
                head_dim=hidden // heads,
                intermediate_size=4 * hidden,
                vocab_size=int(d["vocab_size"]),
                norm_eps=float(d.get("layer_norm_epsilon", 1e-5)),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
                max_position_embeddings=int(d.get("seq_length") or 2048),
                residual_post_layernorm=bool(d.get("apply_residual_connection_post_layernorm", False)),
                bos_token_id=d.get("bos_token_id"),
                eos_token_ids=eos_ids,
            )
        known = ", ".join(sorted(LLAMA_LIKE | BLOOM_LIKE))
        raise CheckpointError(f"model type {model_type!r} is not supported yet (supported: {known})")

    @classmethod
    def from_folder(cls, folder: Path) -> ModelConfig:
        path = Path(folder) / "config.json"
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            raise CheckpointError(f"{folder} has no config.json: is it a Hugging Face model folder?") from None
        except (KeyError, ValueError, TypeError) as e:
            raise CheckpointError(f"{path} is not a valid model config ({e})") from None


def _rope_params(d: dict[str, Any]) -> dict[str, Any]:
    """Normalise the two spellings: transformers 5's `rope_parameters` and the older
    `rope_theta` + `rope_scaling` that most hub checkpoints still carry."""
    params = dict(d.get("rope_parameters") or {})
    scaling = d.get("rope_scaling") or {}
    params.update({k: v for k, v in scaling.items() if k not in params})
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params.pop("type")
    params.setdefault("rope_type", "default")
    params.setdefault("rope_theta", float(d.get("rope_theta", 10000.0)))
    return params
