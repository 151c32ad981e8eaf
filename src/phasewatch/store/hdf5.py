"""What phasewatch reads of HDF5's own file format, without h5py.

The signature and the version 2/3 superblock at offset 0 (HDF5 File Format Specification 3.0,
§III.A.1, "Superblock").

Layout of a version 2/3 superblock (little-endian): bytes 0-7 the signature, 8 the version, 9 the
size of offsets, 10 the size of lengths, 11 the file consistency flags (bit 0: opened for write,
bit 2: opened for SWMR write; cleared by a clean close, left set by a killed writer), then, with
8-byte offsets, the base address (12-19), the superblock extension address (20-27) and the
end-of-file address (28-35), relative to the base address.
"""

from __future__ import annotations

import os
import struct

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_WRITE_FLAGS = 0x05  # bit 0 (write access) | bit 2 (SWMR write access)


def has_signature(head: bytes) -> bool:
    """Whether ``head`` (a file's first bytes) starts with the HDF5 signature at offset 0."""
    return head[:8] == HDF5_SIGNATURE


def superblock_eof(path: str | os.PathLike) -> int | None:
    """The end of file (bytes) that a version 2/3 superblock with 8-byte offsets records, or None.

    That is base address + end-of-file address; None for any other file."""
    with open(path, "rb") as fh:
        head = fh.read(44)
    if len(head) < 44 or not has_signature(head) or head[8] not in (2, 3) or head[9] != 8:
        return None
    base, _ext, eof = struct.unpack_from("<3Q", head, 12)
    return base + eof


def writer_attached(path: str | os.PathLike) -> bool | None:
    """Whether an HDF5 file is open for writing, from its superblock's consistency flags.

    Bit 0: opened for write, bit 2: SWMR write; cleared by a clean close, left set by a writer
    that was killed.  None: unreadable, or not a version 2/3 superblock."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(12)
    except OSError:
        return None
    if len(head) < 12 or not has_signature(head) or head[8] not in (2, 3):
        return None
    return bool(head[11] & _WRITE_FLAGS)
