"""The client stack: its config, routes, chains of peer sessions, the `SwarmModel` with discovery, bans and
failover, and `swarm status`. Knows the protocol and peer transports and records; never sampling,
drafts or tokenizers."""
