"""Run-level telemetry: counters, gauges and latency histograms, written as JSONL events and
exposed as Prometheus text. Used by evaluation and by long steps; plots in the report read the JSONL."""
import json
import resource
import threading
import time
from pathlib import Path

import numpy as np

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0   # Linux reports KiB


class Telemetry:
    def __init__(self, jsonl_path=None, prefix="quark"):
        self.prefix = prefix
        self.path = Path(jsonl_path) if jsonl_path else None
        self.counters, self.gauges, self.samples = {}, {}, {}
        self._lock = threading.Lock()

    def _event(self, kind, name, value, labels):
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps({"t": time.time(), "kind": kind, "name": name, "value": value, **labels}) + "\n")

    def count(self, name, n=1, **labels):
        with self._lock:
            self.counters[name] = self.counters.get(name, 0) + n
        self._event("counter", name, n, labels)

    def gauge(self, name, value, **labels):
        with self._lock:
            self.gauges[name] = value
        self._event("gauge", name, value, labels)

    def observe(self, name, seconds, **labels):
        with self._lock:
            self.samples.setdefault(name, []).append(seconds)
        self._event("latency", name, seconds, labels)

    def timer(self, name, **labels):
        tel = self

        class _Timer:
            def __enter__(self):
                self.t0 = time.perf_counter()
                return self

            def __exit__(self, *exc):
                self.seconds = time.perf_counter() - self.t0
                tel.observe(name, self.seconds, **labels)

        return _Timer()

    def summary(self):
        out = {f"{k}_total": v for k, v in self.counters.items()} | dict(self.gauges)
        for name, xs in self.samples.items():
            p = np.percentile(xs, [50, 90, 99])
            out |= {f"{name}_p50": float(p[0]), f"{name}_p90": float(p[1]), f"{name}_p99": float(p[2]),
                    f"{name}_count": len(xs)}
        out["peak_rss_mb"] = peak_rss_mb()
        return out

    def prometheus(self):
        """Prometheus text exposition format (version 0.0.4)."""
        lines = []
        with self._lock:
            for name, v in sorted(self.counters.items()):
                lines += [f"# TYPE {self.prefix}_{name}_total counter", f"{self.prefix}_{name}_total {v}"]
            for name, v in sorted(self.gauges.items()):
                lines += [f"# TYPE {self.prefix}_{name} gauge", f"{self.prefix}_{name} {v}"]
            for name, xs in sorted(self.samples.items()):
                m = f"{self.prefix}_{name}_seconds"
                lines.append(f"# TYPE {m} histogram")
                for b in LATENCY_BUCKETS:
                    lines.append(f'{m}_bucket{{le="{b}"}} {sum(x <= b for x in xs)}')
                lines += [f'{m}_bucket{{le="+Inf"}} {len(xs)}', f"{m}_sum {sum(xs)}", f"{m}_count {len(xs)}"]
        lines += ["# TYPE process_peak_rss_megabytes gauge", f"process_peak_rss_megabytes {peak_rss_mb():.1f}"]
        return "\n".join(lines) + "\n"
