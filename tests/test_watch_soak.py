"""The soak's short form (bench/watch_soak.py runs 1,000 frames): 300 answered frames of a 100 fps synthetic camera
through Model.watch. After the warm-up, resident memory grows by less than 20 MB, threads and open files do not
grow, and the median frame -> answer latency does not drift."""

from __future__ import annotations

from vl2edge.bench import watch_soak


def test_the_loop_holds_memory_threads_files_and_latency_flat(tiny_model):
    doc = watch_soak.soak(tiny_model, frames=300)
    assert doc["summary"]["frames_answered"] == 300 and doc["summary"]["end_reason"] == "max_frames"
    assert doc["summary"]["frames_dropped"] > 0  # the camera is faster than the model: the latest frame won
    failed = [c for c in doc["checks"] if not c["ok"]]
    assert not failed, watch_soak.table(doc)
    assert {c["check"] for c in doc["checks"]} == {"rss_growth_mb", "threads_growth", "open_files_growth",
                                                   "latency_drift"}
