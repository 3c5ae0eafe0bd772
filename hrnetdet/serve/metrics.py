"""The server's Prometheus counters, kept in its one HTTP process and written as Prometheus' text
exposition format (no client library needed for three series): requests by route and status,
``/predict`` latency, and the size of the batches the model ran."""
import threading
from collections import Counter
from typing import Dict, List, Sequence, Tuple

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Histogram:
    """Cumulative buckets, a sum and a count, as Prometheus reads them."""

    def __init__(self, buckets: Sequence[float]):
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.sum, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        for i, edge in enumerate(self.buckets):
            if value <= edge:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> List[str]:
        out = [f'{name}_bucket{{le="{edge:g}"}} {n}' for edge, n in zip(self.buckets, self.counts)]
        return out + [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum:.6f}",
                      f"{name}_count {self.count}"]


class Metrics:
    """What ``GET /metrics`` reports; updated from the event loop and its decode threads."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: Dict[Tuple[str, int], int] = Counter()
        self.latency = Histogram(LATENCY_BUCKETS)
        self.batch_size = Histogram(BATCH_BUCKETS)

    def request(self, route: str, status: int, seconds: float) -> None:
        with self.lock:
            self.requests[(route, status)] += 1
            if route == "/predict":
                self.latency.observe(seconds)

    def batch(self, size: int) -> None:
        with self.lock:
            self.batch_size.observe(size)

    def render(self) -> str:
        with self.lock:
            lines = ["# HELP hrnetdet_requests_total HTTP requests answered, by route and status.",
                     "# TYPE hrnetdet_requests_total counter"]
            lines += [f'hrnetdet_requests_total{{route="{route}",status="{status}"}} {n}'
                      for (route, status), n in sorted(self.requests.items())]
            lines += ["# HELP hrnetdet_request_latency_seconds Time to answer POST /predict, errors included.",
                      "# TYPE hrnetdet_request_latency_seconds histogram"]
            lines += self.latency.lines("hrnetdet_request_latency_seconds")
            lines += ["# HELP hrnetdet_batch_size Images per model run (dynamic batching).",
                      "# TYPE hrnetdet_batch_size histogram"]
            lines += self.batch_size.lines("hrnetdet_batch_size")
        return "\n".join(lines) + "\n"
