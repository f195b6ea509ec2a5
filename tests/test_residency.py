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


def test_page_out_gives_back_a_graphs_pages_then_a_directorys_and_keeps_their_data(tmp_path):
    data = np.random.default_rng(0).integers(0, 255, 8 << 20, dtype=np.uint8)
    files = {"graph": tmp_path / "layer1_moe.onnx.data", "neighbour": tmp_path / "layer10_moe.onnx.data",
             "outside": tmp_path.parent / f"{tmp_path.name}-elsewhere.bin"}
    sizes = {"graph": 8 << 20, "neighbour": 2 << 20, "outside": 1 << 20}
    for k, f in files.items():
        f.write_bytes(data[:sizes[k]].tobytes())
    handles = {k: open(f, "rb") for k, f in files.items()}
    maps = {k: mmap.mmap(h.fileno(), 0, access=mmap.ACCESS_READ) for k, h in handles.items()}
    try:
        views = {k: np.frombuffer(m, np.uint8) for k, m in maps.items()}
        for k, v in views.items():  # every page touched: resident
            assert int(v[::4096].sum()) == int(data[:sizes[k]:4096].sum())
        ranges = {k: [r[:2] for r in mapped_ranges(tmp_path.parent) if r[2] == str(f.resolve())]
                  for k, f in files.items()}
        assert all(len(r) == 1 for r in ranges.values())
        rss = lambda k: resident_bytes(*ranges[k][0])  # noqa: E731
        assert [rss(k) for k in files] == [sizes[k] for k in files]
        # a graph's name: its own files (X.onnx.data), not a neighbour whose name merely starts alike
        assert [r[2] for r in mapped_ranges(tmp_path / "layer1_moe.onnx")] == [str(files["graph"].resolve())]
        assert page_out_files(tmp_path / "layer1_moe.onnx") == sizes["graph"]
        assert rss("graph") < sizes["graph"] // 8 and rss("neighbour") == sizes["neighbour"]
        # a directory: everything under it, nothing outside it
        assert page_out_files(tmp_path) == sizes["graph"] + sizes["neighbour"]
        assert rss("neighbour") < sizes["neighbour"] // 8 and rss("outside") == sizes["outside"]
        for k, v in views.items():  # read again from the files, unchanged
            assert np.array_equal(v, data[:sizes[k]])
        del views, v
    finally:
        for m in maps.values():
            m.close()
        for h in handles.values():
            h.close()
        files["outside"].unlink()


def test_nothing_mapped_under_a_directory_is_nothing_to_do(tmp_path):
    assert mapped_ranges(tmp_path) == []
    assert page_out_files(tmp_path) == 0
