"""One node of the swarm. So far: the model engine (`peer.model`) that peers and clients share."""
