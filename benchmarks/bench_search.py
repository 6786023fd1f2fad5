"""Vector search: quark.search.Index against hnswlib (HNSW, same M=16, ef_construction=200) and
faiss IndexFlatL2 / numpy BLAS (exact search), same run, on data that is not easy.

Data: a mixture of many overlapping clusters, each a Gaussian with its own random rotation and its
own anisotropic, slowly decaying spectrum, so the intrinsic dimension stays high (iid-noise-like
within clusters, no low-rank shortcut) and neighbours often come from other clusters. Queries are
fresh draws from the same mixture; ground truth is exact l2 (numpy BLAS).

Reported per dataset: exact search (1000 queries, k=10) time and GFLOP/s; HNSW build time with the
same threads; recall@10 / QPS over ef with one search thread; index memory (RSS growth while
building, malloc_trim'ed between builds, and quark's own count).
"""
import ctypes
import gc
import time

import numpy as np

import quark
from benchmarks.harness import Result, interleaved, summarize
from quark.search import Index

EF_GRID = (10, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


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


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def trim():
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


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


def _build(make, x):
    trim()
    r0 = rss_bytes()
    t0 = time.perf_counter()
    index = make(x)
    secs = time.perf_counter() - t0
    return index, secs, rss_bytes() - r0


def _hnswlib_build(x, threads):
    import hnswlib
    p = hnswlib.Index(space="l2", dim=x.shape[1])
    p.init_index(max_elements=len(x), M=16, ef_construction=200, random_seed=0)
    p.set_num_threads(threads)
    p.add_items(x)
    return p


def _quark_build(x, storage):
    index = Index(x.shape[1], storage=storage, M=16, ef_construction=200)
    index.add(x)
    return index


def _curve(name, search_fns, q, truth, quick):
    """Recall@10 and single-thread QPS over ef for each provider; returns Result rows + best-at-0.95."""
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
    return rows


def run_dataset(name, n, d, nq, quick):
    threads = quark.num_threads()
    x, q = hard_data(n, d, nq, seed=d)
    t0 = time.perf_counter()
    truth = exact_numpy(x, q, 10)
    print(f"\n{name}: n={n} d={d} queries={nq}, ground truth in {time.perf_counter() - t0:.1f}s", flush=True)
    rows = _exact_rows(name, x, q, threads, quick)

    builds = {}
    for prov, make in (("hnswlib", lambda a: _hnswlib_build(a, threads)),
                       ("quark hnsw fp32", lambda a: _quark_build(a, "fp32")),
                       ("quark hnsw sq8", lambda a: _quark_build(a, "sq8"))):
        index, secs, rss = _build(make, x)
        builds[prov] = (index, secs, rss)
        print(f"build {prov:<16} {secs:8.1f} s ({threads} threads)  RSS growth {rss / 2**20:8.1f} MiB"
              + (f"  (quark count {index.memory_bytes() / 2**20:.1f} MiB)" if prov != "hnswlib" else ""), flush=True)
        rows.append(Result("search", f"{name} hnsw build ({threads} thr)", prov, secs, secs, secs,
                           extra={"rss_growth_bytes": rss}))
    base = builds["hnswlib"]
    for prov in ("quark hnsw fp32", "quark hnsw sq8"):
        _, secs, rss = builds[prov]
        print(f"  {prov}: build time {secs / base[1]:.2f}x hnswlib, memory {rss / base[2]:.2f}x hnswlib (RSS growth)")
    sq8 = builds["quark hnsw sq8"][0]
    in_ram = sq8.memory_bytes() - n * d * 4
    print(f"  quark hnsw sq8 without its fp32 re-rank rows (kept in the file with load(mmap=True)): "
          f"{in_ram / 2**20:.1f} MiB = {in_ram / base[2]:.2f}x hnswlib")

    # sq8 served from a file: codes, links and rows mapped; only the rows re-ranked get paged in.
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        sq8.save(f"{tmp}/sq8.qsi")
        trim()
        r0 = rss_bytes()
        mapped = Index.load(f"{tmp}/sq8.qsi", mmap=True)
        mapped.search(q, 10, ef=64)
        grown = rss_bytes() - r0
        print(f"  quark hnsw sq8 load(mmap=True) + {len(q)} searches: RSS growth {grown / 2**20:.1f} MiB = "
              f"{grown / base[2]:.2f}x hnswlib (mapped file pages included)")
        del mapped
    hl = builds["hnswlib"][0]
    fp32, sq8 = builds["quark hnsw fp32"][0], builds["quark hnsw sq8"][0]
    hl.set_num_threads(1)
    quark.set_num_threads(1)
    try:
        def hnswlib_search(ef):
            hl.set_ef(ef)
            return hl.knn_query(q, 10)[0]

        rows += _curve(name, {"hnswlib": hnswlib_search,
                              "quark hnsw fp32": lambda ef: fp32.search(q, 10, ef=ef)[1],
                              "quark hnsw sq8": lambda ef: sq8.search(q, 10, ef=ef)[1]}, q, truth, quick)
    finally:
        quark.set_num_threads(threads)
    return rows


def compare(quick=False):
    sizes = [("d128", 20_000, 128, 300), ("d384", 10_000, 384, 300)] if quick else \
            [("d128", 200_000, 128, 1000), ("d384", 100_000, 384, 1000)]
    rows = []
    for name, n, d, nq in sizes:
        rows += run_dataset(name, n, d, nq, quick)
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
