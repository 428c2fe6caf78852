"""Screening Deflated Explicit VR Little Endian files before any DICOM reader inflates them.

Every DICOM reader (pydicom too) inflates a deflated data set whole, in memory, so a deflate bomb
(a few MB that inflate to many GB) must be refused before a reader sees it.
"""

from __future__ import annotations

import zlib
from pathlib import Path

_DEFLATED = b"1.2.840.10008.1.2.1.99"


def deflated_size_over(path: Path, limit_bytes: int) -> int | None:
    """For a Deflated Explicit VR file, the inflated size once it passes ``limit_bytes`` (else None).

    DICOM readers inflate the whole data set in memory, so a deflate bomb (a few MB that
    inflate to many GB) must be caught before any reader sees it. Inflation stops at the
    limit; any other file costs one read of its first kilobyte.
    """
    with open(path, "rb") as handle:
        head = handle.read(1024)
        if _DEFLATED not in head:
            return None
        handle.seek(0)
        handle.seek(_meta_end(handle.read(1 << 16)))  # file meta groups are far shorter than this
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        total = 0
        try:
            while not inflater.eof:
                chunk = handle.read(1 << 16)
                if not chunk:
                    return None
                while chunk:
                    total += len(inflater.decompress(chunk, 1 << 20))
                    if total > limit_bytes:
                        return total
                    chunk = inflater.unconsumed_tail
        except zlib.error:
            return None  # not a valid stream: the reader reports it
    return None


def _meta_end(head: bytes) -> int:
    """Where the (explicit VR little endian) file meta group ends: the deflated stream starts there."""
    pos = 132 if head[128:132] == b"DICM" else 0
    while pos + 8 <= len(head) and head[pos:pos + 2] == b"\x02\x00":
        vr = head[pos + 4:pos + 6]
        if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT", b"UC", b"UR"):
            pos += 12 + int.from_bytes(head[pos + 8:pos + 12], "little")
        else:
            pos += 8 + int.from_bytes(head[pos + 6:pos + 8], "little")
    return pos
