"""phasewatch.store.hdf5: the superblock facts read without h5py, checked against real HDF5 files
written by h5py (the ground truth: the file's size, and whether h5py holds it open for writing)."""

from __future__ import annotations

import h5py
import numpy as np

from phasewatch.store.hdf5 import HDF5_SIGNATURE, has_signature, superblock_eof, writer_attached


def test_signature_is_the_specification_s():
    # HDF5 File Format Specification, §III.A.1: \211 'H' 'D' 'F' \r \n \032 \n
    assert HDF5_SIGNATURE == bytes([0x89, 0x48, 0x44, 0x46, 0x0D, 0x0A, 0x1A, 0x0A])


def test_superblock_of_a_closed_file(tmp_path):
    p = tmp_path / "a.h5"
    with h5py.File(p, "w", libver="latest") as f:
        f["x"] = np.arange(1000.0)
    assert has_signature(p.read_bytes()[:8])
    assert superblock_eof(p) == p.stat().st_size  # base address 0: EOF address = file length
    assert writer_attached(p) is False


def test_writer_flags_while_open(tmp_path):
    p = tmp_path / "live.h5"
    f = h5py.File(p, "w", libver="latest")
    try:
        f.create_dataset("x", shape=(0,), maxshape=(None,), dtype="f8", chunks=(16,))
        f.swmr_mode = True
        f.flush()
        assert writer_attached(p) is True
    finally:
        f.close()
    assert writer_attached(p) is False


def test_not_a_version_2_or_3_superblock(tmp_path):
    old = tmp_path / "v0.h5"
    with h5py.File(old, "w", libver="earliest") as f:  # version 0 superblock: no flags byte here
        f["x"] = 1
    assert has_signature(old.read_bytes()[:8])
    assert superblock_eof(old) is None and writer_attached(old) is None
    other = tmp_path / "x.txt"
    other.write_bytes(b"not hdf5 at all, but long enough to hold a superblock's 44 bytes")
    assert not has_signature(other.read_bytes())
    assert superblock_eof(other) is None and writer_attached(other) is None
    assert writer_attached(tmp_path / "missing.h5") is None
