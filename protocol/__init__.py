"""The wire format between clients and peers (messages, framing, tensor codec, encryption, one hop's codec).

Knows neither the model nor the network. Its messages arrive with peers serving block ranges.
"""
