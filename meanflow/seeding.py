"""Stable seeds from printable parts, shared by the objectives' draws and the embedded data streams."""

import hashlib


def stream_seed(*parts: object) -> int:
    """A stable 63-bit seed from any printable parts (Python's hash() is salted per process)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)
