"""Corrupt a packed run at random and check the reader: only PhasewatchError, one line, no hang.

Not collected by pytest (a hang would stall the suite): run it by hand with a timeout, e.g.

    timeout 300 python tests/fuzz/fuzz_reader.py data/grokking-p71.h5 300 1

It prints each case as it starts, so after a timeout the last line names the case that hung, and
it ends with every unexpected exception type it met.  Known finding (2026-11-22, h5py 3.16 with
HDF5 2.0.0): seed 1, case 34 (a zeroed run of bytes) makes HDF5 loop forever reading the root
attribute 'format' of a plainly opened file; the reader now walks a single file's metadata in a
child process with a time limit first (set PHASEWATCH_OPEN_TIMEOUT=5 to fuzz quickly).
"""

from __future__ import annotations

import logging
import random
import sys
import warnings

import phasewatch
from phasewatch.errors import PhasewatchError


def corrupt(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    b = bytearray(data)
    kind = rng.choice(["flip", "zero", "trunc", "chunk"])
    if kind == "flip":
        for _ in range(rng.randint(1, 8)):
            j = rng.randrange(len(b))
            b[j] ^= 1 << rng.randrange(8)
    elif kind == "zero":
        j = rng.randrange(len(b))
        k = min(len(b), j + rng.randint(1, 512))
        b[j:k] = bytes(k - j)
    elif kind == "trunc":
        b = b[: rng.randrange(len(b))]
    else:
        j = rng.randrange(len(b))
        k = min(len(b), j + 64)
        b[j:k] = bytes(rng.randrange(256) for _ in range(k - j))
    return bytes(b), kind


def main() -> None:
    src, n, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    logging.getLogger("phasewatch").setLevel(logging.CRITICAL)
    rng = random.Random(seed)
    data = open(src, "rb").read()
    unexpected: dict[str, tuple[int, str]] = {}
    path = f"/tmp/phasewatch-fuzz-{seed}.h5"
    for i in range(n):
        blob, kind = corrupt(data, rng)
        with open(path, "wb") as fh:
            fh.write(blob)
        print(i, kind, flush=True)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                run = phasewatch.open_run(path)
                try:
                    phasewatch.analyze(run, window=10)
                except PhasewatchError:
                    pass
        except PhasewatchError as e:
            if "\n" in str(e):
                unexpected.setdefault(f"multi-line message: {str(e)[:80]!r}", (i, kind))
        except Exception as e:  # noqa: BLE001 - the point is to collect them
            first = str(e).splitlines()[0][:100] if str(e) else ""
            unexpected.setdefault(f"{type(e).__name__}: {first}", (i, kind))
    for k, v in unexpected.items():
        print("UNEXPECTED", v, k)
    print("done", n, "cases,", len(unexpected), "unexpected kinds")


if __name__ == "__main__":
    main()
