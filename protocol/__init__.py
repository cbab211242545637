"""The wire format between clients and peers (messages, framing, tensor codec, encryption).

Knows neither the model nor the network. Its messages arrive with peers serving block ranges.
"""
