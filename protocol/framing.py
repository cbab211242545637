"""Length-prefixed frames: a 4-byte big-endian length, then that many bytes.

The length is checked against the receiver's limit before a single byte of the body is allocated.
Knows nothing about sockets; every transport (libp2p stream, TCP) reads the header with
`parse_header` and then exactly that many bytes.
"""

from __future__ import annotations

import struct

HEADER = struct.Struct(">I")
HEADER_SIZE = HEADER.size
DEFAULT_MAX_FRAME = 64 * 1024 * 1024  # 64 MiB: a 4096-wide fp32 prefill of 4096 tokens


class FrameTooLarge(ValueError):
    """A frame header announced more bytes than the receiver accepts."""


def frame(payload: bytes | bytearray | memoryview) -> bytes:
    return HEADER.pack(len(payload)) + bytes(payload)


def header(length: int) -> bytes:
    return HEADER.pack(length)


def parse_header(data: bytes, max_frame: int = DEFAULT_MAX_FRAME) -> int:
    (length,) = HEADER.unpack(data)
    if length > max_frame:
        raise FrameTooLarge(f"frame of {length} bytes exceeds the limit of {max_frame} bytes")
    return length
