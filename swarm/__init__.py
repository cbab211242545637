"""The swarm as a whole, seen from a client: decoding (`decode/`), the client stack (`client/`),
measuring tools (`bench/`) and the face (`cli`, `chat`, `bundled`, `launch`).

Builds on `peer` (the model engine, transports, records) and `protocol`; neither imports back.
"""
