"""The swarm as a whole, seen from a client: decoding (`decode/`), the client stack (`client/`),
measuring tools (`bench/`) and the face (`cli`, `commands`, `flags`, `argtypes`, `chat`, `console`,
`text`, `logs`), with what the face stands on: model names (`registry`, `bundled`) and local peer
processes (`launch`).

Builds on `peer` (the model engine, transports, records) and `protocol`; neither imports back.
"""
