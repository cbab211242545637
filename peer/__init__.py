"""One node of the swarm: the model engine (`peer.model`), its libp2p node and DHT record, the block server."""

import os


def set_threads(threads: int | None) -> None:
    """torch CPU threads: as given, else half the cores (peers and clients share small machines;
    oversubscribed cores make torch tens of times slower)."""
    import torch

    torch.set_num_threads(threads or max(1, (os.cpu_count() or 2) // 2))
