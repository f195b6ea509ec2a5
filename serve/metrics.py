"""The server's counters and latency percentiles, written in the Prometheus text exposition format (0.0.4).

Counters are totals since start. Latencies are Prometheus summaries: `_sum` and `_count` since start, and the
quantiles over the last WINDOW observations (a sliding window, so a slow start does not mask the current latency).
Everything is updated under one lock: the event loop and the model's worker thread both write here.
"""

from __future__ import annotations

import collections
import threading
import time

import numpy as np

WINDOW = 1024
QUANTILES = (0.5, 0.9, 0.99)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# name -> help; all summaries, in seconds
SUMMARIES = {
    "request_seconds": "Chat-completion requests from arrival to the last byte, by the server's clock.",
    "queue_wait_seconds": "Time a request waited for the model (the model serves one request at a time).",
    "ttft_seconds": "Request arrival to its first generated token (queue wait included).",
    "time_per_output_token_seconds": "Mean decode step of each request (after the first token).",
}


class Summary:
    def __init__(self):
        self.window: collections.deque[float] = collections.deque(maxlen=WINDOW)
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        self.window.append(v)
        self.sum += v
        self.count += 1

    def quantile(self, q: float) -> float:
        return float(np.quantile(np.fromiter(self.window, float), q)) if self.window else float("nan")

    def median(self) -> float | None:
        return self.quantile(0.5) if self.window else None


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.started = time.time()
        self.requests = collections.Counter()  # HTTP status of /v1/chat/completions -> count
        self.finished = collections.Counter()  # finish reason -> count
        self.tokens = collections.Counter()  # prompt / cached_prompt / completion
        self.summaries = {name: Summary() for name in SUMMARIES}
        self.queue_depth = lambda: 0
        self.running = lambda: 0

    def count_request(self, status: int) -> None:
        with self._lock:
            self.requests[str(status)] += 1

    def count_finished(self, reason: str, prompt: int, cached: int, completion: int) -> None:
        with self._lock:
            self.finished[reason] += 1
            self.tokens.update(prompt=prompt, cached_prompt=cached, completion=completion)

    def observe(self, name: str, seconds: float | None) -> None:
        if seconds is None:
            return
        with self._lock:
            self.summaries[name].observe(float(seconds))

    def median(self, name: str) -> float | None:
        with self._lock:
            return self.summaries[name].median()

    def render(self) -> str:
        with self._lock:
            out: list[str] = []

            def family(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
                out.append(f"# HELP vl2edge_{name} {help_}")
                out.append(f"# TYPE vl2edge_{name} {kind}")
                out.extend(f"vl2edge_{name}{labels} {_fmt(v)}" for labels, v in samples)

            family("requests_total", "counter", "Chat-completion requests answered, by HTTP status.",
                   [(f'{{status="{s}"}}', n) for s, n in sorted(self.requests.items())] or [("", 0)])
            family("requests_finished_total", "counter", "Generations that ran, by finish reason.",
                   [(f'{{reason="{r}"}}', n) for r, n in sorted(self.finished.items())] or [("", 0)])
            for kind, help_ in (("prompt", "Prompt tokens of finished generations."),
                                ("cached_prompt", "Prompt tokens reused from the KV cache (not prefilled)."),
                                ("completion", "Generated tokens.")):
                family(f"{kind}_tokens_total", "counter", help_, [("", self.tokens[kind])])
            family("queue_depth", "gauge", "Requests waiting for the model.", [("", self.queue_depth())])
            family("requests_running", "gauge", "Requests the model is working on (0 or 1).", [("", self.running())])
            family("uptime_seconds", "gauge", "Seconds since the server started.", [("", time.time() - self.started)])
            for name, help_ in SUMMARIES.items():
                s = self.summaries[name]
                samples = [(f'{{quantile="{q}"}}', s.quantile(q)) for q in QUANTILES]
                family(name, "summary", help_, samples)
                out.append(f"vl2edge_{name}_sum {_fmt(s.sum)}")
                out.append(f"vl2edge_{name}_count {s.count}")
            return "\n".join(out) + "\n"


def _fmt(v: float) -> str:
    if isinstance(v, int):
        return str(v)
    if v != v:
        return "NaN"
    return repr(float(v))
