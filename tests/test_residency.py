"""runtime/residency.py: the artifact's file pages a session read while loading are given back, without losing data."""

import mmap
import sys

import numpy as np
import pytest

from vl2edge.runtime.residency import mapped_ranges, page_out_files

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/maps and madvise are Linux")


def resident_bytes(lo: int, hi: int) -> int:
    """Rss of the mapping that starts at lo, from /proc/self/smaps."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                a, b = (int(x, 16) for x in head.split("-"))
                inside = (a, b) == (lo, hi)
            elif inside and head == "Rss:":
                return int(line.split()[1]) * 1024
    raise AssertionError("mapping not found")


def test_page_out_gives_back_the_pages_of_files_under_a_directory_and_keeps_their_data(tmp_path):
    data = np.random.default_rng(0).integers(0, 255, 8 << 20, dtype=np.uint8)
    (tmp_path / "weights.onnx.data").write_bytes(data.tobytes())
    other = tmp_path.parent / f"{tmp_path.name}-elsewhere.bin"  # a mapping outside the directory is left alone
    other.write_bytes(data[: 1 << 20].tobytes())
    with open(tmp_path / "weights.onnx.data", "rb") as f, open(other, "rb") as g:
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        n = mmap.mmap(g.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            view = np.frombuffer(m, np.uint8)
            assert int(view[::4096].sum()) == int(data[::4096].sum())  # every page touched: resident
            assert int(np.frombuffer(n, np.uint8)[::4096].sum()) >= 0
            (lo, hi, path), = mapped_ranges(tmp_path)
            assert path.endswith("weights.onnx.data") and hi - lo == len(data)
            (olo, ohi, _), = [r for r in mapped_ranges(other.parent) if r[2] == str(other.resolve())]
            assert resident_bytes(lo, hi) == len(data)
            assert page_out_files(tmp_path) == len(data)
            assert resident_bytes(lo, hi) < len(data) // 8  # given back
            assert resident_bytes(olo, ohi) == 1 << 20  # not ours to touch
            assert np.array_equal(view, data)  # and read again from the file, unchanged
            del view
        finally:
            m.close()
            n.close()
            other.unlink()


def test_nothing_mapped_under_a_directory_is_nothing_to_do(tmp_path):
    assert mapped_ranges(tmp_path) == []
    assert page_out_files(tmp_path) == 0
