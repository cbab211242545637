"""Decoding: plain and speculative generation over any `RunBlocks` (`target`), sampling and verification,
the round policy. Knows `peer.model`'s head and step layouts; never peers, routes, failover or sockets."""
