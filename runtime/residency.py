"""Give back the artifact's file pages that a session touched while loading and will not read again.

ONNX Runtime maps a graph's external data file into memory and reads its initializers from the mapping. Kernels
that prepack their weights (MatMulNBits, QMoE) copy them into their own layout at session creation and never read
the mapping again, but the pages they read stay resident and count in the process's RSS until the kernel needs the
memory. QMoE's fp32 block scales are such pages: measured on one real-dims Small MoE layer (block 128), 17 MiB of
the mapping stayed resident after load and five runs later nothing of it had come back after these were paged out
(/proc/self/status RssFile 31 -> 14 MiB, RssAnon unchanged); at block 64 it is 33 MiB per layer, 0.9 GB over
Small's 26 MoE layers.

MADV_PAGEOUT (Linux 5.4+) asks the kernel to reclaim the pages of a range now. It never loses data: a clean page of
a file mapping is dropped and read again from the file on the next access, and a page the process wrote (a
copy-on-write page of a private mapping) is only ever swapped, never discarded. So what a kernel does still read
(an embedding row, a weight used in place) simply faults back in on its next use.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

MADV_PAGEOUT = 21  # linux/mman.h

_madvise = None


def _libc_madvise():
    global _madvise
    if _madvise is None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.madvise.restype = ctypes.c_int
        _madvise = libc.madvise
    return _madvise


def mapped_ranges(path: str | os.PathLike) -> list[tuple[int, int, str]]:
    """(start, end, file) of this process's memory mappings of the files under `path` if it is a directory, else of
    `path` and the files named after it (a graph X.onnx and its external data X.onnx.data). Linux; [] elsewhere."""
    path = Path(path).resolve()
    prefix = str(path) + (os.sep if path.is_dir() else "")
    out = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].rstrip("\n").startswith(prefix):
                    lo, hi = (int(x, 16) for x in parts[0].split("-"))
                    out.append((lo, hi, parts[5].rstrip("\n")))
    except OSError:
        return []
    return out


def page_out_files(path: str | os.PathLike) -> int:
    """Ask the kernel to reclaim the resident pages of the mappings `mapped_ranges(path)` lists. Returns the bytes of
    address space advised (0 where the platform or kernel does not support it)."""
    if not sys.platform.startswith("linux"):
        return 0
    ranges = mapped_ranges(path)
    if not ranges:
        return 0
    try:
        madvise = _libc_madvise()
    except (OSError, AttributeError):  # no libc with madvise to call: nothing given back, nothing lost
        return 0
    advised = 0
    for lo, hi, _ in ranges:
        if madvise(lo, hi - lo, MADV_PAGEOUT) == 0:
            advised += hi - lo
        else:  # EINVAL before Linux 5.4: nothing to do, and nothing lost
            return advised
    return advised
