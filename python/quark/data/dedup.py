"""Deduplication (pipeline step `dedup`): clean/docs.jsonl -> dedup/docs.jsonl (same records, one
per duplicate cluster, with meta.dup_cluster_size) and dedup/stats.json.

Two kinds of duplicate are merged into the same clusters:
  exact  the same text after lowercasing and collapsing whitespace (a 64-bit BLAKE2b key);
  near   MinHash-LSH (Broder 1997; Leskovec et al., Mining of Massive Datasets ch. 3): signatures
         from the C++ kernel quark.ops.minhash (word 5-gram shingles, 128 permutations by default)
         are cut into b bands of r rows; two documents that agree on a whole band are candidates.
         The probability of that is 1 - (1 - J^r)^b, an S-curve around the threshold; (b, r) are
         chosen, as datasketch does, to minimise the area of false positives below the threshold
         plus false negatives above it.
Documents linked by any shared key are joined with union-find (the root is the lowest index, so
the first document of every cluster is the one kept).

Bounded memory: documents are read in chunks of chunk_docs; each chunk is reduced to its keys
(1 + b uint64 per document) and saved to dedup/work/ (which also makes the slow pass resumable).
The grouping pass then holds one key column, its sort order and the union-find parent array at a
time: about 40 bytes per document, whatever the text length (1M documents: ~40 MB plus one chunk).
"""
import hashlib
import json
import resource
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
from tqdm import tqdm

from quark.config import ConfigError, Step, from_dict
from quark.data.shards import file_state
from quark.io import atomic_open, atomic_write_json
from quark.ops import minhash
from quark.rundir import RunDir


@dataclass
class DedupConfig:
    exact: bool = True
    near: bool = True
    threshold: float = 0.75         # Jaccard above which documents are near-duplicates (FineWeb: 14x8 bands, ~0.72)
    num_perm: int = 128
    ngram: int = 5                  # FineWeb and Gopher dedup on word 5-grams
    unit: Literal["word", "char"] = "word"
    bands: int = 0                  # 0: choose (bands, rows) for the threshold; else rows = num_perm // bands
    chunk_docs: int = 20_000
    seed: int = 0

    def __post_init__(self):
        if not 0.0 < self.threshold < 1.0:
            raise ConfigError(f"dedup.threshold: must be in (0, 1), got {self.threshold}")
        if not 16 <= self.num_perm <= 1024:
            raise ConfigError(f"dedup.num_perm: must be in [16, 1024], got {self.num_perm}")
        if self.ngram < 1 or self.chunk_docs < 1:
            raise ConfigError("dedup.ngram and dedup.chunk_docs: must be >= 1")
        if self.bands < 0 or self.bands > self.num_perm:
            raise ConfigError(f"dedup.bands: must be in [0, num_perm], got {self.bands}")


def validate_config(cfg):
    from_dict(DedupConfig, cfg, "dedup")


def optimal_bands(threshold, num_perm, fp_weight=0.5, fn_weight=0.5):
    """(bands, rows) with bands * rows <= num_perm minimising the weighted false-positive area
    (similarity below the threshold yet a candidate) plus false-negative area (above it, missed)."""
    best, best_err = (1, num_perm), float("inf")
    lo, hi = np.linspace(0.0, threshold, 201), np.linspace(threshold, 1.0, 201)
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            fp = np.trapezoid(1 - (1 - lo ** r) ** b, lo)
            fn = np.trapezoid((1 - hi ** r) ** b, hi)
            err = fp_weight * fp + fn_weight * fn
            if err < best_err:
                best, best_err = (b, r), err
    return best


def exact_key(text):
    norm = " ".join(text.lower().split())
    return int.from_bytes(hashlib.blake2b(norm.encode("utf-8"), digest_size=8).digest(), "little")


def band_keys(sig, bands, rows):
    """(n, num_perm) uint64 -> (n, bands) uint64: each band's rows hashed into one 64-bit key."""
    n = sig.shape[0]
    out = np.empty((n, bands), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for b in range(bands):
            h = np.full(n, 0x9E3779B97F4A7C15, dtype=np.uint64)
            for j in range(rows):
                h = (h ^ sig[:, b * rows + j]) * np.uint64(0x100000001B3)
                h ^= h >> np.uint64(29)
            out[:, b] = h
    return out


class UnionFind:
    """Parent array with the lowest index as every root, so each cluster's root is its first document."""

    def __init__(self, n):
        self.parent = np.arange(n, dtype=np.int64)

    def find(self, x):
        p = self.parent
        while p[x] != x:
            p[x] = p[p[x]]  # path halving
            x = p[x]
        return x

    def union_sorted_groups(self, keys):
        """Join every run of equal keys: each member with the first member of its run."""
        order = np.argsort(keys, kind="stable")
        k = keys[order]
        same = k[1:] == k[:-1]
        if not same.any():
            return 0
        run_start = np.maximum.accumulate(np.where(np.concatenate(([True], ~same)), np.arange(len(k)), 0))
        heads, members = order[run_start[1:][same]], order[1:][same]
        p = self.parent
        for a, b in zip(heads.tolist(), members.tolist()):
            ra, rb = self.find(a), self.find(b)
            if ra != rb:
                p[max(ra, rb)] = min(ra, rb)
        return int(same.sum())

    def roots(self):
        p = self.parent
        while True:  # pointer jumping until every node points at its root
            q = p[p]
            if np.array_equal(q, p):
                return p
            p = q


def _iter_lines(path):
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                yield line


def run_step(run_dir, cfg):
    c = from_dict(DedupConfig, cfg, "dedup")
    run_dir = RunDir.of(run_dir)
    src = run_dir.input("clean", "docs.jsonl")
    out = run_dir.output("dedup")
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    bands, rows = (c.bands, c.num_perm // c.bands) if c.bands else optimal_bands(c.threshold, c.num_perm)
    settings = {"num_perm": c.num_perm, "ngram": c.ngram, "unit": c.unit, "bands": bands, "rows": rows,
                "seed": c.seed, "chunk_docs": c.chunk_docs, "input": file_state([src])}
    settings_path = work / "settings.json"
    settings = json.loads(json.dumps(settings))  # tuples -> lists, as they come back from the file
    if not settings_path.exists() or json.loads(settings_path.read_text()) != settings:
        for old in work.glob("keys-*.npy"):  # keys from other settings would not match
            old.unlink()
        atomic_write_json(settings_path, settings)
    t0 = time.time()

    # Pass 1: keys per chunk (resumable: finished chunks are skipped).
    n, chunk, k = 0, [], 0
    bar = tqdm(desc="dedup keys", unit="doc", disable=None)

    def flush(lines, k):
        path = work / f"keys-{k:05d}.npy"
        if path.exists():
            return
        texts = []
        for line in lines:
            try:
                texts.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{src}: a line in chunk {k} is not a JSON record with 'text'") from None
        keys = np.empty((len(texts), 1 + bands), dtype=np.uint64)
        keys[:, 0] = np.fromiter((exact_key(t) for t in texts), dtype=np.uint64, count=len(texts))
        sig = minhash(texts, num_perm=bands * rows, ngram=c.ngram, seed=c.seed, unit=c.unit)
        keys[:, 1:] = band_keys(sig, bands, rows)
        with atomic_open(path) as f:
            np.save(f, keys)

    for line in _iter_lines(src):
        chunk.append(line)
        n += 1
        if len(chunk) == c.chunk_docs:
            flush(chunk, k)
            bar.update(len(chunk))
            chunk, k = [], k + 1
    if chunk:
        flush(chunk, k)
        bar.update(len(chunk))
        k += 1
    bar.close()

    # Pass 2: one key column at a time -> union-find clusters.
    chunks = [np.load(work / f"keys-{i:05d}.npy", mmap_mode="r") for i in range(k)]
    uf = UnionFind(n)
    columns = ([0] if c.exact else []) + (list(range(1, bands + 1)) if c.near else [])
    exact_dups = 0
    for col in tqdm(columns, desc="dedup groups", unit="band", disable=None):
        keys = np.concatenate([ch[:, col] for ch in chunks]) if chunks else np.zeros(0, np.uint64)
        linked = uf.union_sorted_groups(keys)
        if col == 0:
            exact_dups = linked
    roots = uf.roots()
    keep = roots == np.arange(n)
    sizes = np.bincount(roots, minlength=n)

    # Pass 3: write the kept documents in input order.
    with atomic_open(out / "docs.jsonl", "wb") as f:
        for i, line in enumerate(_iter_lines(src)):
            if keep[i]:
                rec = json.loads(line)
                rec.setdefault("meta", {})["dup_cluster_size"] = int(sizes[i])
                f.write(json.dumps(rec, ensure_ascii=False).encode("utf-8") + b"\n")
    kept = int(keep.sum())
    stats = {"docs_in": n, "kept": kept, "dropped": {"exact": exact_dups, "near": n - kept - exact_dups},
             "clusters_with_duplicates": int((sizes > 1).sum()), "largest_cluster": int(sizes.max()) if n else 0,
             "threshold": c.threshold, "num_perm": bands * rows, "bands": bands, "rows": rows, "ngram": c.ngram,
             "unit": c.unit, "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
             "seconds": round(time.time() - t0, 2)}
    atomic_write_json(out / "stats.json", stats)
    return stats


STEP = Step(name="dedup", config=DedupConfig, run=run_step, check=validate_config)
