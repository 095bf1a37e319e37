"""Server metrics in Prometheus' text exposition format (version 0.0.4), written by hand.

Counters and histograms are kept per label set under one lock: the HTTP layer updates them from the
event loop, and /metrics reads them. Written here rather than with ``prometheus_client`` to keep the
server's dependencies to FastAPI and uvicorn; the format is a few lines of text per series.
"""

from __future__ import annotations

import math
import threading
from collections import defaultdict

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def _escape(value: object) -> str:
    """Label values escape backslash, double quote and newline (the exposition format's rule)."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(pairs: tuple[tuple[str, str], ...]) -> str:
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs) + "}"


def _number(x: float) -> str:
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    return repr(float(x)) if isinstance(x, float) else str(x)


class _Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # per bucket, not cumulative; the last is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        i = next((i for i, b in enumerate(self.buckets) if value <= b), len(self.buckets))
        self.counts[i] += 1
        self.sum += value
        self.count += 1


class Metrics:
    """Requests by endpoint and status, request latency, time to first token, token counts."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple, int] = defaultdict(int)  # (("endpoint", e), ("status", s)) -> count
        self.latency: dict[tuple, _Histogram] = {}
        self.ttft: dict[tuple, _Histogram] = {}
        self.prompt_tokens: dict[tuple, int] = defaultdict(int)
        self.generated_tokens: dict[tuple, int] = defaultdict(int)

    def observe_request(self, endpoint: str, status: int | str, seconds: float) -> None:
        with self._lock:
            self.requests[(("endpoint", endpoint), ("status", str(status)))] += 1
            key = (("endpoint", endpoint),)
            self.latency.setdefault(key, _Histogram(LATENCY_BUCKETS)).observe(seconds)

    def observe_generation(self, model: str, prompt_tokens: int, completion_tokens: int,
                           ttft: float | None) -> None:
        with self._lock:
            key = (("model", model),)
            self.prompt_tokens[key] += prompt_tokens
            self.generated_tokens[key] += completion_tokens
            if ttft is not None:
                self.ttft.setdefault(key, _Histogram(TTFT_BUCKETS)).observe(ttft)

    def render(self, extra: list[tuple[str, str, str, float]] = ()) -> str:
        """The exposition text; ``extra`` adds (name, "gauge" | "counter", help, value) series read at
        scrape time (queue depth, batch steps)."""
        out: list[str] = []

        def counter(name: str, help_: str, series: dict[tuple, int]) -> None:
            out.extend([f"# HELP {name} {help_}", f"# TYPE {name} counter"])
            out.extend(f"{name}{_labels(k)} {v}" for k, v in sorted(series.items()))

        def histogram(name: str, help_: str, series: dict[tuple, _Histogram]) -> None:
            out.extend([f"# HELP {name} {help_}", f"# TYPE {name} histogram"])
            for key, h in sorted(series.items()):
                running = 0
                for bound, count in zip([*h.buckets, math.inf], h.counts, strict=True):
                    running += count
                    out.append(f"{name}_bucket{_labels((*key, ('le', _number(bound))))} {running}")
                out.append(f"{name}_sum{_labels(key)} {_number(h.sum)}")
                out.append(f"{name}_count{_labels(key)} {h.count}")

        with self._lock:
            counter("featherlm_requests_total", "HTTP requests by endpoint and status code.", self.requests)
            histogram("featherlm_request_duration_seconds",
                      "Time from request to the end of the response (streams: the last event).", self.latency)
            histogram("featherlm_time_to_first_token_seconds",
                      "Time from a generation request's arrival to its first sampled token.", self.ttft)
            counter("featherlm_prompt_tokens_total", "Prompt tokens of generation requests.", self.prompt_tokens)
            counter("featherlm_generated_tokens_total", "Tokens generated (end tokens not counted).",
                    self.generated_tokens)
        for name, kind, help_, value in extra:
            out.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {_number(value)}"])
        return "\n".join(out) + "\n"
