"""A peer's identity: its Ed25519 libp2p key pair, kept in a key file (the peer id is its hash).

Knows libp2p keys and files; nothing of networking.
"""

from __future__ import annotations

import logging
from pathlib import Path

from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair, KeyType
from libp2p.identity_utils import load_identity, save_identity

log = logging.getLogger("specswarm.p2p")


def load_or_create_identity(path: str | Path | None) -> KeyPair:
    """Ed25519 key pair from `path`; created there (mode 0600, parent dirs too) if missing. None: ephemeral."""
    if path is None:
        return create_new_key_pair()
    path = Path(path)
    if not path.exists():
        key_pair = create_new_key_pair()
        save_identity(key_pair, path)
        log.info("created a new peer identity in %s", path)
        return key_pair
    try:
        key_pair = load_identity(path)
    except Exception as exc:
        raise ValueError(f"identity file {path} is not a libp2p private key ({exc}); move it away to "
                         "create a new identity (the peer ID will change)") from exc
    if key_pair.private_key.get_type() != KeyType.Ed25519:
        raise ValueError(f"identity file {path} holds a {key_pair.private_key.get_type().name} key, not Ed25519")
    return key_pair
