"""Shared benchmark machinery: interleaved timing of ours vs peers, medians, throughput, tables.

Rules (BENCHMARKS.md, at its top): peers run in the same process and the same run, calls are
interleaved round-robin so drift (turbo, other load) hits every provider alike, medians are reported
with p10/p90, sizes exceed the caches where the real workload does (rotate buffers), and every row
carries GFLOP/s or GB/s beside its time.
"""
import glob
import json
import math
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass
class Result:
    area: str
    case: str
    provider: str
    median_s: float
    p10_s: float
    p90_s: float
    work: float = 0.0          # FLOPs (unit GFLOP/s) or bytes (unit GB/s) per call
    unit: str = "GFLOP/s"
    extra: dict = field(default_factory=dict)

    @property
    def rate(self):
        return self.work / self.median_s / 1e9 if self.work and self.median_s > 0 else float("nan")


def interleaved(providers, repeats=10, warmup=2, min_time=0.0):
    """Time each callable in providers {name: fn} round-robin; returns {name: [seconds...]}."""
    for _ in range(warmup):
        for fn in providers.values():
            fn()
    times = {name: [] for name in providers}
    start = time.perf_counter()
    rounds = 0
    while rounds < repeats or (time.perf_counter() - start) < min_time:
        for name, fn in providers.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
        rounds += 1
    return times


def summarize(area, case, times, work=0.0, unit="GFLOP/s", extra=None):
    """Turn interleaved() output into Result rows (one per provider)."""
    rows = []
    for name, ts in times.items():
        q = np.percentile(ts, [10, 50, 90])
        rows.append(Result(area, case, name, float(q[1]), float(q[0]), float(q[2]), work, unit, dict(extra or {})))
    return rows


def llc_bytes():
    """Size of the largest cache the OS reports for cpu0 (32 MiB when it reports none). Server parts
    can have hundreds of MiB of L3, so working sets must be sized against the real figure."""
    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        if text.rstrip("KMG").isdigit():
            sizes.append(int(text.rstrip("KMG")) * scale)
    return max(sizes, default=32 << 20)


def copies_beyond_llc(nbytes, minimum=8):
    """How many distinct copies of an nbytes working set to cycle through so that together they span
    1.5x the last-level cache: every call then streams its operands from DRAM, as the real workload
    (a decode step over all layers) does."""
    return max(minimum, math.ceil(1.5 * llc_bytes() / max(nbytes, 1)))


def measure_read_bandwidth(nbytes=None, repeats=5):
    """Sustained read bandwidth in GB/s of this machine (sum over a buffer far beyond the LLC, all threads)."""
    import torch
    nbytes = nbytes or max(1 << 30, 2 * llc_bytes())
    buf = torch.ones(nbytes // 4, dtype=torch.float32)
    buf.sum()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        buf.sum()
        ts.append(time.perf_counter() - t0)
    return nbytes / statistics.median(ts) / 1e9


def machine_info():
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import quark
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": quark.num_threads(), "isa": quark.info()["isa"],
            "torch": torch.__version__, "python": platform.python_version()}


def print_table(rows):
    """Print rows grouped by case; ratio = provider median / Quark median (> 1: Quark is faster)."""
    by_case = {}
    for r in rows:
        by_case.setdefault((r.area, r.case), []).append(r)
    print(f"{'area':<10} {'case':<44} {'provider':<22} {'median ms':>10} {'p10':>9} {'p90':>9} {'rate':>16} {'ratio':>7}")
    for (area, case), group in by_case.items():
        ours = next((r for r in group if r.provider.startswith("quark")), group[0])
        for r in group:
            rate = f"{r.rate:,.1f} {r.unit}" if r.work else ""
            print(f"{area:<10} {case:<44} {r.provider:<22} {r.median_s*1e3:>10.3f} {r.p10_s*1e3:>9.3f} "
                  f"{r.p90_s*1e3:>9.3f} {rate:>16} {r.median_s / ours.median_s:>6.2f}x")


def write_json(rows, path):
    with open(path, "w") as f:
        json.dump({"machine": machine_info(), "results": [asdict(r) | {"rate": r.rate} for r in rows]}, f, indent=1)
