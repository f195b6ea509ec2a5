"""The perception loop (runtime/watch.py, frame_reader.py, frame_sources.py): latest frame wins with a source
faster than the model, every frame when asked, a file paced at its own rate, an HTTP file and a live MJPEG stream
served on loopback by the test, end / stall / disconnect / corrupt frames, sources that cannot be opened, the
kept prefix, and the overlay."""

from __future__ import annotations

import http.server
import io
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vl2edge.bench.scene_video import scene_frame, write_pngs, write_video
from vl2edge.runtime.frame_reader import LatestFrameReader
from vl2edge.runtime.frame_sources import FrameSource, IterableSource, SourceError, open_source
from vl2edge.runtime.frames import Frame

PROMPT = "<image>\n<|ref|>the red mug<|/ref|>."
FAST = {"max_new_tokens": 3}
W, H = 64, 48  # small frames: one tile of the test preset, a few ms of vision


def frames(n: int, width=W, height=H):
    """A synthetic camera as fast as the reader takes: frame k is scene_frame(k)."""
    for k in range(n):
        yield scene_frame(k, width, height)


class BurstCamera:
    """A camera faster than the model, made of events instead of clocks: `burst` frames arrive at once (the reader
    keeps only the newest), then nothing until the consumer has its answer and calls next_burst(). Frame k is
    scene_frame(k); after `bursts` bursts the camera ends."""

    def __init__(self, bursts: int, burst: int):
        self.bursts, self.burst = bursts, burst
        self._go, self._delivered = threading.Event(), threading.Event()
        self._go.set()

    def __iter__(self):
        for b in range(self.bursts):
            self._go.wait()
            self._go.clear()
            for k in range(b * self.burst, (b + 1) * self.burst):
                yield scene_frame(k, W, H)
            self._delivered.set()  # resumed only after the reader put the burst's last frame in its slot
        self._go.wait()
        self._delivered.set()

    def wait_delivered(self) -> None:
        assert self._delivered.wait(30), "the reader never took the burst"
        self._delivered.clear()

    def next_burst(self) -> None:
        self._go.set()
        self.wait_delivered()


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return write_video(tmp_path_factory.mktemp("video") / "clip.mp4", 20, fps=10, width=W, height=H)


class _Serve:
    """An HTTP server on 127.0.0.1 in a thread, for the duration of a with-block."""

    def __init__(self, handler):
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self):
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


# --- latest frame wins ----------------------------------------------------------------------------------------------
def test_the_reader_holds_one_frame_whatever_the_source_rate():
    """1,000 frames arrive while nobody takes any: 999 are dropped and the one kept is the newest."""
    reader = LatestFrameReader(IterableSource(np.full((4, 4, 3), k % 256, np.uint8) for k in range(1000))).start()
    reader._thread.join(10)
    assert reader.read == 1000 and reader.dropped == 999
    frame = reader.take(timeout=1)
    assert frame.index == 999 and frame.array[0, 0, 0] == 999 % 256
    assert reader.take(timeout=1) is None and reader.end_reason == "end"


def test_latest_frame_wins_with_a_source_faster_than_the_model(tiny_model):
    """Five frames arrive for every answer: four are dropped, never queued, each answer is about the newest frame,
    and every frame read is either answered or counted as dropped."""
    camera = BurstCamera(bursts=8, burst=5)
    answers = []
    with tiny_model.watch(camera, PROMPT, **FAST) as w:
        camera.wait_delivered()
        for a in w:
            answers.append(a)
            camera.next_burst()  # the next frames arrive while this answer is being read: the model is "slow"
        s = w.summary()
    assert s["end_reason"] == "end" and s["frames_read"] == 40
    assert [a.index for a in answers] == [4, 9, 14, 19, 24, 29, 34, 39]  # the newest of each burst
    assert s["frames_dropped"] == 32 and s["frames_answered"] + s["frames_dropped"] == s["frames_read"]
    prev = -1
    for a in answers:  # each answer's dropped count is exactly the gap since the previous answered frame
        assert a.dropped_since_last == a.index - prev - 1 == 4
        assert np.array_equal(a.frame.array, scene_frame(a.index, W, H))  # the pixels of that frame
        prev = a.index
    # latency is counted from the frame's decode: it includes its wait in the slot
    assert all(a.frame_to_answer_s >= a.stages["wait_s"] > 0 for a in answers)


def test_all_frames_answers_every_frame_in_order(tiny_model):
    with tiny_model.watch(frames(12), PROMPT, all_frames=True, **FAST) as w:
        got = [a.index for a in w]
    assert got == list(range(12)) and w.summary()["frames_dropped"] == 0


def test_every_and_max_frames(tiny_model):
    """The period spaces the answers' starts (a lower bound only); an endless source read as fast as it goes drops
    the frames of the period instead of queueing them."""
    t0 = time.perf_counter()
    with tiny_model.watch(frames(10**9), PROMPT, every=0.2, max_frames=3, **FAST) as w:
        answers = list(w)
    assert len(answers) == 3 and w.summary()["end_reason"] == "max_frames"
    assert time.perf_counter() - t0 >= 0.4  # three answers, the period between their starts
    assert all(a.dropped_since_last > 0 for a in answers[1:])  # frames of the period are dropped, not queued
    assert not w.reader.alive  # the reader stops with the loop


# --- sources ----------------------------------------------------------------------------------------------------------
def test_a_video_file_is_paced_at_its_frame_rate_unless_every_frame_is_asked(tiny_model, clip):
    t0 = time.perf_counter()
    with tiny_model.watch(str(clip), PROMPT, **FAST) as w:
        answers = list(w)
    wall = time.perf_counter() - t0
    assert w.summary()["frames_read"] == 20 and w.end_reason == "end"
    assert wall >= 1.9 * 0.95  # 20 frames at 10 fps: delivered as a camera would, not as fast as decoded
    for a in answers:
        assert a.timestamp == pytest.approx(a.index / 10, abs=1e-6)  # the video's own presentation times
        # lossy, but the frame the model saw is that frame (not its neighbour: the mug moves 14 px a frame)
        err = np.abs(a.frame.array.astype(int) - scene_frame(a.index, W, H)).mean()
        assert err < 8, (a.index, err)
    with tiny_model.watch(str(clip), PROMPT, all_frames=True, **FAST) as w:
        assert [a.index for a in w] == list(range(20))


def test_a_directory_and_a_glob_of_images(tiny_model, tmp_path):
    frames = write_pngs(tmp_path / "frames", 4, W, H)
    with tiny_model.watch(str(frames), PROMPT, all_frames=True, **FAST) as w:
        answers = list(w)
    assert [a.index for a in answers] == [0, 1, 2, 3]
    assert all(np.array_equal(a.frame.array, scene_frame(a.index, W, H)) for a in answers)  # PNG: exact
    with tiny_model.watch(str(frames / "frame_000[13].png"), PROMPT, all_frames=True, **FAST) as w:
        assert [np.array_equal(a.frame.array, scene_frame(k, W, H)) for a, k in zip(w, (1, 3))] == [True, True]


def test_a_corrupt_frame_is_skipped_and_counted(tiny_model, tmp_path):
    frames = write_pngs(tmp_path / "frames", 4, W, H)
    data = (frames / "frame_0002.png").read_bytes()
    (frames / "frame_0002.png").write_bytes(data[:len(data) // 2])  # truncated mid-stream
    with tiny_model.watch(str(frames), PROMPT, all_frames=True, **FAST) as w:
        answers = list(w)
    assert [a.index for a in answers] == [0, 1, 3] and answers[2].skipped_since_last == 1
    s = w.summary()
    assert s["frames_skipped"] == 1 and "frame_0002.png" in s["skip_reasons"][0] and s["end_reason"] == "end"
    # from Python: an item that is no image is skipped the same way, never a crash of the loop
    items = [scene_frame(0, W, H), np.zeros((H, W, 3), np.float32), b"not an image", scene_frame(3, W, H)]
    with tiny_model.watch(items, PROMPT, all_frames=True, **FAST) as w:
        assert [a.index for a in w] == [0, 3]
    assert w.summary()["frames_skipped"] == 2 and "dtype float32" in w.summary()["skip_reasons"][0]


def test_a_stalled_source_ends_the_loop_with_a_summary(tiny_model):
    """A source that goes silent (it waits on an event nobody sets until the end): the loop ends at the stall
    timeout, not when the source comes back."""
    release = threading.Event()

    def stalls():
        yield scene_frame(0, W, H)
        yield scene_frame(1, W, H)
        release.wait(60)
        yield scene_frame(2, W, H)

    try:
        with tiny_model.watch(stalls(), PROMPT, all_frames=True, stall_timeout=0.5, **FAST) as w:
            assert [a.index for a in w] == [0, 1]
        assert w.summary()["end_reason"] == "stalled" and not release.is_set()
    finally:
        release.set()


def test_bgr_frames_from_an_iterable(tiny_model):
    rgb = scene_frame(5, W, H)
    with tiny_model.watch([rgb[:, :, ::-1]], PROMPT, channels="bgr", **FAST) as w:
        (a,) = list(w)
    by_rgb = tiny_model.generate(PROMPT, images=[rgb], **FAST)
    assert a.result.token_ids == by_rgb.token_ids


def test_an_http_file_on_loopback(tiny_model, clip):
    class Files(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(clip.parent), **k)

        def log_message(self, *a):
            pass

    with _Serve(Files) as srv:
        with tiny_model.watch(f"{srv.url}/{clip.name}", PROMPT, all_frames=True, **FAST) as w:
            answers = list(w)
    assert [a.index for a in answers] == list(range(20)) and w.end_reason == "end"


def _mjpeg_handler(frames: int, then: str, connections: int | None = None, hold: threading.Event | None = None):
    """A live MJPEG camera (multipart/x-mixed-replace, as IP cameras serve it); after `frames` frames it hangs up
    ("close") or keeps the connection open and sends nothing until `hold` is set ("stall"); after `connections`
    connections it answers 404."""
    served = []

    class Camera(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            served.append(1)
            if connections is not None and len(served) > connections:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
            self.end_headers()
            for k in range(frames):
                buf = io.BytesIO()
                Image.fromarray(scene_frame(k, W, H)).save(buf, "JPEG", quality=95)
                self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n"
                                 % len(buf.getvalue()) + buf.getvalue() + b"\r\n")
                self.wfile.flush()
            if then == "stall":
                hold.wait(60)

    return Camera


def test_a_live_mjpeg_stream_that_disconnects_or_stalls(tiny_model):
    with _Serve(_mjpeg_handler(8, "close")) as srv:
        src = open_source(f"{srv.url}/video")
        assert src.live and not src.paced  # a live stream is never paced
        with tiny_model.watch(src, PROMPT, **FAST) as w:
            answers = list(w)
        s = w.summary()
    assert answers and s["frames_read"] == 8 and s["end_reason"].startswith("disconnected")
    assert answers[-1].index == 7 and np.abs(answers[-1].frame.array.astype(int) - scene_frame(7, W, H)).mean() < 8
    hold = threading.Event()
    with _Serve(_mjpeg_handler(5, "stall", hold=hold)) as srv:
        try:
            with tiny_model.watch(f"{srv.url}/video", PROMPT, stall_timeout=1.0, **FAST) as w:
                list(w)
            assert w.summary()["end_reason"] == "stalled" and w.summary()["frames_read"] == 5
            assert not hold.is_set()  # ended by the timeout, while the camera still held the connection
        finally:
            hold.set()


def test_a_stream_is_reopened_when_asked(tiny_model):
    """`reconnect` counts failures in a row: a camera that comes back is followed for as long as it does."""
    with _Serve(_mjpeg_handler(3, "close", connections=3)) as srv:
        with tiny_model.watch(f"{srv.url}/video", PROMPT, reconnect=1, **FAST) as w:
            list(w)
    s = w.summary()
    assert s["frames_read"] == 9  # 3 frames on each of three connections
    assert s["end_reason"].startswith("disconnected") and "reconnect 1 of 1 failed" in s["end_reason"]
    assert "404" in s["end_reason"]


@pytest.mark.parametrize("spec, says", [
    ("missing.mp4", "'{tmp}/missing.mp4': no such file"),
    ("notes.mp4", "cannot open (Invalid data found when processing input)"),
    ("/dev/video77", "'/dev/video77': cannot open"),
    ("empty-dir", "a directory with no image files"),
    ("nothing-*.png", "no file matches"),
])
def test_a_source_that_cannot_be_opened_is_one_clear_error(tmp_path, spec, says):
    (tmp_path / "notes.mp4").write_text("not a video")
    (tmp_path / "empty-dir").mkdir()
    path = spec if spec.startswith("/dev") else str(tmp_path / spec)
    with pytest.raises(SourceError) as e:
        open_source(path)
    assert says.format(tmp=tmp_path) in str(e.value)


def test_refused_connections_and_non_sources():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(SourceError, match=rf"'http://127.0.0.1:{port}/cam': cannot open \(Connection refused\)"):
        open_source(f"http://127.0.0.1:{port}/cam")
    for bad in (42, np.zeros((4, 4, 3), np.uint8), Frame(np.zeros((4, 4, 3), np.uint8))):
        with pytest.raises(SourceError, match="not a frame source"):
            open_source(bad)


def test_without_pyav_the_error_names_the_extra(monkeypatch, clip):
    import sys

    monkeypatch.setitem(sys.modules, "av", None)  # `import av` now fails as if it were not installed
    with pytest.raises(SourceError, match=r'needs PyAV: pip install "vl2edge\[video\]"'):
        open_source(str(clip))


# --- the prompt, the cache, the summary -----------------------------------------------------------------------------
def test_the_prompt_before_the_image_stays_in_the_cache(tiny_model):
    """System prompt and question before <image> are prefilled once; each later frame prefills from the image on,
    and its answer equals the answer without the cache."""
    system = "You are the perception module of a kitchen robot. Answer with the object's box only. " * 4
    prompt = "Where is the red mug on the table? Give its box.\n<image>"
    frames = [scene_frame(k, W, H) for k in range(3)]
    with tiny_model.watch(frames, prompt, system=system, all_frames=True, **FAST) as w:
        kept = list(w)
    with tiny_model.watch(frames, prompt, system=system, all_frames=True, reuse_cache=False, **FAST) as w:
        fresh = list(w)
    prefix = kept[0].prompt_tokens - (kept[0].prompt_tokens - kept[1].cached_tokens)
    assert kept[1].cached_tokens == kept[2].cached_tokens > 60 and all(a.cached_tokens == 0 for a in fresh)
    assert kept[1].result.timings["prefill_tokens"] == kept[1].prompt_tokens - prefix
    assert [a.result.token_ids for a in kept] == [a.result.token_ids for a in fresh]


def test_max_tiles_applies_to_the_loop_and_is_restored(tiny_model):
    big = scene_frame(0, 640, 480)
    before = tiny_model.processor.image_processor
    with tiny_model.watch([big], PROMPT, max_tiles=1, **FAST) as w:
        (one,) = list(w)
    assert tiny_model.processor.image_processor is before
    with tiny_model.watch([big], PROMPT, **FAST) as w:
        (default,) = list(w)
    assert one.result.timings["vision_tiles"] == 2 < default.result.timings["vision_tiles"]


def test_answer_and_summary_schemas(tiny_model):
    with tiny_model.watch(frames(3), PROMPT, all_frames=True, **FAST) as w:
        a = next(w)
        d = a.as_dict()
    assert set(d) == {"type", "index", "timestamp", "text", "boxes", "stop_reason", "tokens", "prompt_tokens",
                      "cached_tokens", "image_size", "frame_to_first_token_s", "frame_to_answer_s",
                      "dropped_since_last", "skipped_since_last", "stages"}
    assert d["type"] == "frame" and d["image_size"] == [W, H] and set(d["stages"]) == {
        "read_s", "wait_s", "preprocess_s", "vision_s", "prefill_s", "decode_s"}
    assert 0 < d["frame_to_first_token_s"] <= d["frame_to_answer_s"]
    s = w.summary()
    assert s["end_reason"] == "closed" and s["frames_answered"] == 1
    assert set(s["frame_to_first_token_s"]) == {"p50", "p90", "max"}


def test_bad_loop_options_are_refused_before_reading(tiny_model, clip):
    with pytest.raises(ValueError, match="every must be >= 0"):
        tiny_model.watch(str(clip), PROMPT, every=-1)
    with pytest.raises(ValueError, match="max_frames must be a positive integer"):
        tiny_model.watch(str(clip), PROMPT, max_frames=0)
    from vl2edge.runtime.chat_template import TemplateError

    with pytest.raises(TemplateError):
        tiny_model.watch(str(clip), "<image><image>\ntwo tags, one frame")
    assert tiny_model.processor.image_processor.max_tiles is None


def test_a_frame_source_subclass_is_taken_as_is(tiny_model):
    class Counter(FrameSource):
        name = "counter"

        def frames(self):
            for k in range(3):
                yield Frame(scene_frame(k, W, H), index=k, timestamp=k / 30, read_at=time.perf_counter())
            self.end_reason = "end"

    with tiny_model.watch(Counter(), PROMPT, all_frames=True, **FAST) as w:
        assert [a.timestamp for a in w] == [0, 1 / 30, 2 / 30]


def test_quick_paths_state_no_real_dims_verdict_on_a_test_preset():
    """bench.fidelity and `bench --quick` on a test preset: the figures, no MISSED or [FAIL] read as a broken install."""
    from vl2edge.bench import fidelity, report
    from vl2edge.model.presets import preset_config, test_preset_of

    assert test_preset_of(preset_config("test-tiny", layers=2)) == "test-tiny"
    assert test_preset_of(preset_config("tiny")) is None and test_preset_of(preset_config("heldout-mla")) is None
    summary = {"worst_cosine": 0.9995, "top1_agreement": 0.9, "expert_mismatch_mean": 0.05}
    verdict = fidelity.policy_verdict(summary, "int4")
    doc = {"artifact": "a", "reference": "r", "conversations": 1, "steps": 8, "stages": {},
           "summary": {**summary, "mean_cosine": 0.9997, "worst_rel_max_error": 0.03, "expert_mismatch_by_layer": {}},
           "policy": {**verdict, "test_preset": "test-tiny"}}
    text = fidelity.table(doc)
    assert "precision policy for int4 experts: not judged on test-tiny" in text
    assert "MISS" not in text and "below top-1 agreement: 0.9 (bar >= 0.95)" in text
    doc["policy"]["test_preset"] = None  # a real checkpoint: the verdict
    assert "precision policy for int4 experts: MISSED" in fidelity.table(doc)
    rows = [{"passed": False, "value": 1.0, "unit": "x", "threshold": 2.0, "op": ">=", "description": "decode",
             "detail": "d"}]
    targets = {"model": "tiny", "precision": "int4", "reference": "fp32", "applies": False, "results": rows}
    lines = report._targets_lines(targets)
    assert any("[info] decode" in line for line in lines) and not any("FAIL" in line for line in lines)
    assert any("[FAIL] decode" in line for line in report._targets_lines({**targets, "applies": True}))
