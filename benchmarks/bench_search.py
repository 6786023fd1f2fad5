"""Vector search: quark.search.Index against hnswlib (HNSW, same M=16, ef_construction=200) and
faiss IndexFlatL2 / numpy BLAS (exact search), same run, on data that is not easy.

Data: a mixture of many overlapping clusters, each a Gaussian with its own random rotation and its
own anisotropic, slowly decaying spectrum, so the intrinsic dimension stays high (iid-noise-like
within clusters, no low-rank shortcut) and neighbours often come from other clusters. Queries are
fresh draws from the same mixture; ground truth is exact l2 (numpy BLAS).

Reported per dataset: exact search (1000 queries, k=10) time and GFLOP/s; HNSW build time with the
same threads (hnswlib and quark fp32 built three times, alternated); recall@10 / QPS over ef with one
search thread; index memory, measured the same way for every library:
  - build: RSS growth of this process while building (malloc_trim'ed before each build);
  - serving: RSS growth of a fresh process from just before loading the saved index to just after
    searching the 1000 queries (VmRSS = anonymous + file-backed mapped pages, /proc/self/status);
    quark's own memory_bytes() (every array at its capacity, graph, id map, scratch) is printed beside.
    quark sq8 with rows="file" leaves its fp32 rows in the index file and preads the re-ranked
    ones: those pages sit in the page cache (reclaimable, in no process's RSS); their size is printed
    beside, and QPS is also measured with the file evicted from the page cache (cold).

    python -m benchmarks --only search            # both datasets (~16 min on the 2-core Xeon)
    python -m benchmarks.bench_search d128        # one dataset; --quick for small sizes
"""
import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

import quark
from benchmarks.harness import Result, interleaved, print_table, summarize
from quark.search import Index

EF_GRID = (10, 16, 24, 32, 40, 48, 56, 64, 80, 96, 128, 192, 256, 384, 512)


def hard_data(n, d, nq, seed=0, clusters=None):
    """(base (n, d), queries (nq, d)) float32 from a rotated anisotropic Gaussian mixture."""
    rng = np.random.default_rng(seed)
    clusters = clusters or max(32, n // 2000)
    centers = rng.standard_normal((clusters, d)).astype(np.float32) * 0.5  # spread < within-cluster size: overlap
    decay = np.exp(-np.arange(d) / (2.0 * d))  # spectrum falls e^-0.5 over d: anisotropic, still full rank
    total = n + nq
    lab = rng.integers(0, clusters, total)
    out = np.empty((total, d), np.float32)
    for c in range(clusters):
        rows = np.nonzero(lab == c)[0]
        rot, _ = np.linalg.qr(rng.standard_normal((d, d)))
        scale = decay * rng.uniform(0.5, 1.5, d)
        z = rng.standard_normal((len(rows), d)) * scale
        out[rows] = centers[c] + (z @ rot.T).astype(np.float32) / np.sqrt(d) * 3
    return np.ascontiguousarray(out[:n]), np.ascontiguousarray(out[n:])


def exact_numpy(x, q, k):
    """Exact l2 top-k with BLAS, in query blocks (also the ground truth)."""
    xn = (x * x).sum(1)
    out = np.empty((len(q), k), np.int64)
    for i in range(0, len(q), 256):
        d = xn[None, :] - 2.0 * (q[i:i + 256] @ x.T)
        part = np.argpartition(d, k, axis=1)[:, :k]
        order = np.argsort(np.take_along_axis(d, part, 1), axis=1)
        out[i:i + 256] = np.take_along_axis(part, order, 1)
    return out


def recall_at(found, truth):
    k = truth.shape[1]
    return float(np.mean([len(set(f[:k]) & set(t)) for f, t in zip(found, truth)]) / k)


def trim():
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def fs_type(path):
    """File system type of the mount holding path (so a tmpfs, i.e. RAM, is not taken for a disk)."""
    path, best = os.path.realpath(path), ("", "?")
    with open("/proc/mounts") as f:
        for line in f:
            mnt, typ = line.split()[1:3]
            if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[0]):
                best = (mnt, typ)
    return best[1]


def _exact_rows(name, x, q, threads, quick):
    rows = []
    flat = Index(x.shape[1], kind="flat")
    flat.add(x)
    providers = {"quark flat": lambda: flat.search(q, 10), "numpy (BLAS)": lambda: exact_numpy(x, q, 10)}
    try:
        import faiss
        faiss.omp_set_num_threads(threads)
        fi = faiss.IndexFlatL2(x.shape[1])
        fi.add(x)
        providers["faiss IndexFlatL2"] = lambda: fi.search(q, 10)
    except ImportError:
        pass
    times = interleaved(providers, repeats=3 if quick else 5, warmup=1)
    rows += summarize("search", f"{name} exact k=10 nq={len(q)} ({threads} thr)", times,
                      work=2.0 * len(q) * x.shape[0] * x.shape[1])
    return rows


def _hnswlib_build(x, threads):
    import hnswlib
    p = hnswlib.Index(space="l2", dim=x.shape[1])
    p.init_index(max_elements=len(x), M=16, ef_construction=200, random_seed=0)
    p.set_num_threads(threads)
    p.add_items(x)
    return p


def _quark_build(x, **kw):
    index = Index(x.shape[1], M=16, ef_construction=200, **kw)
    index.add(x)
    return index


# Run in a fresh interpreter per library: RSS growth from before load to after the queries.
_SERVE = """
import json, sys
import numpy as np
import hnswlib, quark
from quark.search import Index
prov, path, qpath, ef = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
q = np.load(qpath)
quark.set_num_threads(1)
def status():
    with open("/proc/self/status") as f:
        kv = dict(line.split(":", 1) for line in f)
    return {k: int(kv[k].split()[0]) * 1024 for k in ("VmRSS", "RssAnon", "RssFile")}
before = status()
if prov == "hnswlib":
    index = hnswlib.Index(space="l2", dim=q.shape[1])
    index.load_index(path)
    index.set_num_threads(1)
    index.set_ef(ef)
    index.knn_query(q, 10)
else:
    index = Index.load(path)
    index.search(q, 10, ef=ef)
after = status()
out = {k: after[k] - before[k] for k in after}
out["memory_bytes"] = index.memory_bytes() if prov != "hnswlib" else 0
print(json.dumps(out))
"""


def _serving_memory(prov, path, qpath, ef):
    out = subprocess.run([sys.executable, "-c", _SERVE, prov, path, qpath, str(ef)], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _evict(path):
    """Drop the file's pages from the page cache (clean pages; no root needed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _curve(name, search_fns, q, truth, quick):
    """Recall@10 and single-thread QPS over ef for each provider -> (Result rows, best point at recall >= 0.95)."""
    rows, table = [], {}
    for ef in EF_GRID:
        fns, rec = {}, {}
        for prov, fn in search_fns.items():
            ids = fn(ef)
            rec[prov] = recall_at(ids, truth)
            fns[prov] = (lambda fn=fn, ef=ef: fn(ef))
        times = interleaved(fns, repeats=2 if quick else 3, warmup=0)
        for r in summarize("search", f"{name} hnsw ef={ef} 1 thr", times):
            r.extra = {"recall@10": rec[r.provider], "qps": len(q) / r.median_s}
            rows.append(r)
            table.setdefault(r.provider, []).append((ef, rec[r.provider], len(q) / r.median_s))
        if all(v >= 0.995 for v in rec.values()):
            break
    print(f"\n{name}: recall@10 / QPS (1 search thread)")
    print(f"{'ef':>5} " + " ".join(f"{p:>26}" for p in table))
    for i in range(len(next(iter(table.values())))):
        ef = next(iter(table.values()))[i][0]
        print(f"{ef:>5} " + " ".join(f"{c[i][1]:>12.4f} {c[i][2]:>10.0f} q/s" for c in table.values()))
    at95 = {}
    for prov, pts in table.items():
        ok = [p for p in pts if p[1] >= 0.95]
        at95[prov] = max(ok, key=lambda p: p[2]) if ok else None
    print("best QPS at recall@10 >= 0.95: " + ", ".join(
        f"{p}: {v[2]:.0f} q/s (ef={v[0]}, recall {v[1]:.3f})" if v else f"{p}: not reached" for p, v in at95.items()))
    base = at95.get("hnswlib")
    for prov, v in at95.items():
        if v and base and prov != "hnswlib":
            print(f"  {prov} / hnswlib = {v[2] / base[2]:.2f}x")
    return rows, at95


BUILDS = {"hnswlib": lambda x, thr, tmp: _hnswlib_build(x, thr),
          "quark hnsw fp32": lambda x, thr, tmp: _quark_build(x),
          "quark hnsw sq8": lambda x, thr, tmp: _quark_build(x, storage="sq8"),
          "quark hnsw sq8 file": lambda x, thr, tmp: _quark_build(x, storage="sq8", rows="file", rows_dir=tmp)}


def run_dataset(name, n, d, nq, quick):
    threads = quark.num_threads()
    x, q = hard_data(n, d, nq, seed=d)
    t0 = time.perf_counter()
    truth = exact_numpy(x, q, 10)
    print(f"\n{name}: n={n} d={d} queries={nq}, ground truth in {time.perf_counter() - t0:.1f}s", flush=True)
    rows = _exact_rows(name, x, q, threads, quick)

    with tempfile.TemporaryDirectory(prefix="quark-bench-search-") as tmp:
        print(f"index files and the sq8 rows file in {tmp} ({fs_type(tmp)})")
        # Build: every provider once, then hnswlib and quark fp32 (the closest pair) twice more,
        # alternated, so machine drift hits both; the median of each provider's builds is reported.
        order = list(BUILDS) + ([] if quick else ["quark hnsw fp32", "hnswlib"] * 2)
        built, secs, grown = {}, {}, {}
        for prov in order:
            built.pop(prov, None)
            trim()
            r0 = rss_bytes()
            t0 = time.perf_counter()
            built[prov] = BUILDS[prov](x, threads, tmp)
            secs.setdefault(prov, []).append(time.perf_counter() - t0)
            grown.setdefault(prov, rss_bytes() - r0)
            print(f"build {prov:<20} {secs[prov][-1]:8.1f} s ({threads} threads)  RSS growth "
                  f"{grown[prov] / 2**20:8.1f} MiB", flush=True)
        build_rows = {prov: Result("search", f"{name} hnsw build ({threads} thr)", prov, float(np.median(secs[prov])),
                                   min(secs[prov]), max(secs[prov]), extra={"build_rss_growth_bytes": grown[prov]})
                      for prov in BUILDS}
        rows += build_rows.values()
        base_s, base_m = float(np.median(secs["hnswlib"])), grown["hnswlib"]
        for prov in list(BUILDS)[1:]:
            print(f"  {prov}: build time {np.median(secs[prov]) / base_s:.2f}x hnswlib, "
                  f"build RSS growth {grown[prov] / base_m:.2f}x hnswlib")

        # Serving memory, a fresh process per library, at an ef that reaches recall ~0.95 here.
        paths = {prov: os.path.join(tmp, prov.replace(" ", "_") + ".idx") for prov in BUILDS}
        built["hnswlib"].save_index(paths["hnswlib"])
        for prov in list(BUILDS)[1:]:
            built[prov].save(paths[prov])
        qpath = os.path.join(tmp, "queries.npy")
        np.save(qpath, q)
        serve = {prov: _serving_memory(prov, paths[prov], qpath, 64) for prov in BUILDS}
        rows_file_mib = n * d * 4 / 2**20
        for prov, m in serve.items():
            note = f"  (+ up to {rows_file_mib:.1f} MiB of page cache for its fp32 rows)" if "file" in prov else ""
            if m["memory_bytes"]:  # the index's own count of what it holds, as a cross-check of the RSS
                note = f"; memory_bytes() {m['memory_bytes'] / 2**20:.1f} MiB" + note
            print(f"serving {prov:<20} load + {nq} searches: RSS growth {m['VmRSS'] / 2**20:8.1f} MiB "
                  f"(anon {m['RssAnon'] / 2**20:.1f}, file {m['RssFile'] / 2**20:.1f}) = "
                  f"{m['VmRSS'] / serve['hnswlib']['VmRSS']:.2f}x hnswlib{note}", flush=True)
            build_rows[prov].extra["serving_rss_growth_bytes"] = m["VmRSS"]

        # Recall / QPS. The sq8 file index is the one loaded from its saved file (rows read back from
        # it), as it would be served.
        del built["quark hnsw sq8 file"]
        trim()
        served = Index.load(paths["quark hnsw sq8 file"])
        hl, fp32, sq8 = built["hnswlib"], built["quark hnsw fp32"], built["quark hnsw sq8"]
        hl.set_num_threads(1)
        quark.set_num_threads(1)
        try:
            def hnswlib_search(ef):
                hl.set_ef(ef)
                return hl.knn_query(q, 10)[0]

            curve, at95 = _curve(name, {"hnswlib": hnswlib_search,
                                        "quark hnsw fp32": lambda ef: fp32.search(q, 10, ef=ef)[1],
                                        "quark hnsw sq8": lambda ef: sq8.search(q, 10, ef=ef)[1],
                                        "quark hnsw sq8 file": lambda ef: served.search(q, 10, ef=ef)[1]},
                                 q, truth, quick)
            rows += curve
            best = at95.get("quark hnsw sq8 file")
            if best:
                cold = []
                for _ in range(3):
                    _evict(paths["quark hnsw sq8 file"])
                    t0 = time.perf_counter()
                    served.search(q, 10, ef=best[0])
                    cold.append(time.perf_counter() - t0)
                qps = nq / float(np.median(cold))
                print(f"  quark hnsw sq8 file, ef={best[0]}, rows file evicted from the page cache before each "
                      f"run (cold): {qps:.0f} q/s = {qps / at95['hnswlib'][2]:.2f}x hnswlib's best at 0.95"
                      if at95.get("hnswlib") else f"  cold: {qps:.0f} q/s")
        finally:
            quark.set_num_threads(threads)
    return rows


SIZES = {"d128": ((20_000, 128, 300), (200_000, 128, 1000)), "d384": ((10_000, 384, 300), (100_000, 384, 1000))}


def compare(quick=False, datasets=tuple(SIZES)):
    rows = []
    for name in datasets:
        rows += run_dataset(name, *SIZES[name][0 if quick else 1], quick)
    return rows


def test_quark_flat_search(benchmark):
    x, q = hard_data(20_000, 128, 100)
    index = Index(128, kind="flat")
    index.add(x)
    benchmark(index.search, q, 10)


def test_quark_hnsw_search(benchmark):
    x, q = hard_data(20_000, 128, 100)
    index = Index(128, ef_construction=100)
    index.add(x)
    benchmark(index.search, q, 10)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_search", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("datasets", nargs="*", help=f"any of {list(SIZES)} (default: all)")
    ap.add_argument("--quick", action="store_true", help="small sizes and few repeats (a smoke run)")
    args = ap.parse_args()
    unknown = set(args.datasets) - set(SIZES)
    if unknown:
        ap.error(f"unknown datasets {sorted(unknown)}; available: {list(SIZES)}")
    print_table(compare(args.quick, args.datasets or list(SIZES)))
