"""The swarm as a whole: generation, the client and the `swarm` command line. So far: local generation."""
