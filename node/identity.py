"""Persistent Ed25519 identity: the same key file gives the same peer id across restarts."""

from __future__ import annotations

import os
from pathlib import Path

from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.identity_utils import load_identity, save_identity
from libp2p.peer.id import ID
from llmswarm.node import config
from llmswarm.node.errors import NodeError


def load_or_create_identity(identity_path: str | Path | None = None) -> KeyPair:
    """Load the key at `identity_path` (default: config.default_identity_path()), creating it (0600)."""
    path = Path(identity_path) if identity_path is not None else config.default_identity_path()
    if path.exists():
        try:
            return load_identity(path)
        except (OSError, ValueError) as e:
            raise NodeError(
                f"cannot read identity key {path}: {e}; delete it to create a new identity"
            ) from None
    key_pair = create_new_key_pair()
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        save_identity(key_pair, path)  # writes mode 0600
        os.chmod(path, 0o600)
    except OSError as e:
        raise NodeError(f"cannot write identity key {path}: {e}; pass --identity FILE elsewhere") from None
    return key_pair


def peer_id_of(key_pair: KeyPair) -> str:
    return ID.from_pubkey(key_pair.public_key).to_base58()
