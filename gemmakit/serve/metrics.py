"""Prometheus text exposition (format 0.0.4) of the server's counters and latency histograms.

A few dozen lines instead of a dependency: counters and histograms with fixed labels, rendered on
each GET /metrics; gauges are read from the scheduler at that moment. Names follow vLLM's metrics
(`vllm:time_to_first_token_seconds` -> `gemmakit_time_to_first_token_seconds`), so dashboards map over.
"""

from __future__ import annotations

import threading
from collections import defaultdict

# Bucket upper bounds in seconds (vLLM's, trimmed): CPU decode steps take 10-200 ms.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)


def _labels(labels: tuple[tuple[str, str], ...]) -> str:
    if not labels:
        return ""
    esc = (v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for _, v in labels)
    return "{" + ",".join(f'{k}="{v}"' for (k, _), v in zip(labels, esc)) + "}"


class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one: +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        i = next((i for i, b in enumerate(self.buckets) if value <= b), len(self.buckets))
        self.counts[i] += 1
        self.sum += value

    def lines(self, name: str) -> list[str]:
        out, total = [], 0
        for bound, n in zip([*map(repr, self.buckets), "+Inf"], self.counts):
            total += n
            out.append(f'{name}_bucket{{le="{bound}"}} {total}')
        return out + [f"{name}_sum {self.sum!r}", f"{name}_count {total}"]


class Metrics:
    """Thread-safe counters and histograms of one server (the app updates them as requests finish)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple, int] = defaultdict(int)  # (endpoint, status/finish_reason) -> count
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.tpot = Histogram(TPOT_BUCKETS)

    def request(self, endpoint: str, outcome: str) -> None:
        with self._lock:
            self.requests[(("endpoint", endpoint), ("outcome", outcome))] += 1

    def tokens(self, prompt: int, completion: int) -> None:
        with self._lock:
            self.prompt_tokens += prompt
            self.completion_tokens += completion

    def first_token(self, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds)

    def next_token(self, seconds: float) -> None:
        with self._lock:
            self.tpot.observe(seconds)

    def render(self, gauges: dict[str, tuple[str, float]]) -> str:
        """The exposition text; `gauges`: name -> (help, value), read by the caller right now."""
        def head(name: str, kind: str, text: str) -> list[str]:
            return [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]

        with self._lock:
            lines = head("gemmakit_requests_total", "counter",
                         "Finished requests by endpoint and outcome (a finish reason, disconnected, timeout, "
                         "or the HTTP status of a refused request)")
            lines += [f"gemmakit_requests_total{_labels(k)} {v}" for k, v in sorted(self.requests.items())]
            lines += head("gemmakit_prompt_tokens_total", "counter", "Prompt tokens of the requests served")
            lines.append(f"gemmakit_prompt_tokens_total {self.prompt_tokens}")
            lines += head("gemmakit_generation_tokens_total", "counter", "Tokens generated")
            lines.append(f"gemmakit_generation_tokens_total {self.completion_tokens}")
            lines += head("gemmakit_time_to_first_token_seconds", "histogram",
                          "Seconds from a request's arrival to its first generated token")
            lines += self.ttft.lines("gemmakit_time_to_first_token_seconds")
            lines += head("gemmakit_time_per_output_token_seconds", "histogram",
                          "Seconds between consecutive generated tokens of a request")
            lines += self.tpot.lines("gemmakit_time_per_output_token_seconds")
        for name, (text, value) in gauges.items():
            lines += head(name, "gauge", text)
            lines.append(f"{name} {value!r}" if isinstance(value, float) else f"{name} {value}")
        return "\n".join(lines) + "\n"
