"""MinHash signatures: quark.ops.minhash vs datasketch.MinHash on the same documents, same run.

Both compute 128-permutation signatures of word 5-gram shingles. datasketch is timed the way it
is used (shingle in Python, then MinHash.update_batch per document) and also with the shingles
prepared outside the timed region, which isolates its hashing. Rates are signatures per second,
reported as ksig/s (the harness divides `work` by 1e9, so work = documents * 1e6).

compare() is the same-run comparison behind `python -m benchmarks --only data`; the test_*
functions are the pytest-benchmark view.
"""
import random

from benchmarks.harness import interleaved, summarize
from quark.ops import minhash

NUM_PERM, NGRAM = 128, 5


def make_docs(n, words, seed=0):
    rng = random.Random(seed)
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(20_000)]
    return [" ".join(rng.choice(vocab) for _ in range(words)) for _ in range(n)]


def shingles(doc):
    w = doc.lower().split()
    return [" ".join(w[i:i + NGRAM]).encode() for i in range(max(len(w) - NGRAM + 1, 1))]


def datasketch_signatures(docs):
    from datasketch import MinHash
    for d in docs:
        m = MinHash(num_perm=NUM_PERM)
        m.update_batch(shingles(d))


def datasketch_hash_only(shingled):
    from datasketch import MinHash
    for s in shingled:
        m = MinHash(num_perm=NUM_PERM)
        m.update_batch(s)


def compare(quick=False):
    rows = []
    # datasketch is ~100x slower: it gets a slice of the documents and its time is scaled to the
    # full set, so both providers' rates describe the same documents.
    cases = [(2_000, 30, 200), (1_000, 300, 100)] if quick else [(20_000, 30, 1_000), (5_000, 300, 250), (1_000, 2_000, 50)]
    for n, words, n_peer in cases:
        docs = make_docs(n, words)
        peer_docs = docs[:n_peer]
        peer_shingled = [shingles(d) for d in peer_docs]
        scale = n / n_peer
        providers = {
            "quark": lambda: minhash(docs, num_perm=NUM_PERM, ngram=NGRAM),
            "datasketch": lambda: datasketch_signatures(peer_docs),
            "datasketch (hash only)": lambda: datasketch_hash_only(peer_shingled),
        }
        times = interleaved(providers, repeats=3 if quick else 5, warmup=1)
        times = {k: [t * (scale if k != "quark" else 1) for t in v] for k, v in times.items()}
        rows += summarize("data", f"minhash {n} docs x {words} words, 128 perm", times, work=n * 1e6,
                          unit="ksig/s", extra={"peer_docs_timed": n_peer})
    return rows


def test_quark_minhash(benchmark):
    docs = make_docs(2_000, 300)
    benchmark(minhash, docs, NUM_PERM, NGRAM)


def test_datasketch_minhash(benchmark):
    docs = make_docs(100, 300)
    benchmark(datasketch_signatures, docs)


def dedup_at_scale(n=1_000_000, words=30, dup_fraction=0.1, run_dir="/tmp/quark-dedup-scale"):
    """The 1M-short-documents measurement in BENCHMARKS.md: writes run_dir/clean/docs.jsonl with n
    documents of `words` random words, a dup_fraction of them near copies (last word changed) of
    earlier ones, runs the dedup step in this process and prints its stats (time, peak RSS).
    `python -c "from benchmarks.bench_data import dedup_at_scale; dedup_at_scale()"`"""
    import json
    import shutil
    from pathlib import Path

    from quark.data import dedup
    rng = random.Random(0)
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(50_000)]
    root = Path(run_dir)
    shutil.rmtree(root, ignore_errors=True)
    (root / "clean").mkdir(parents=True)
    kept_sample = []
    with open(root / "clean" / "docs.jsonl", "w") as f:
        for i in range(n):
            if kept_sample and rng.random() < dup_fraction:
                w = rng.choice(kept_sample).split()
                w[-1] = rng.choice(vocab)  # last word changed: 25 of 27 word 5-grams shared, J ~ 0.93
                text = " ".join(w)
            else:
                text = " ".join(rng.choice(vocab) for _ in range(words))
                if len(kept_sample) < 10_000:
                    kept_sample.append(text)
                else:
                    kept_sample[rng.randrange(10_000)] = text
            f.write(json.dumps({"id": str(i), "text": text, "source": "synthetic", "meta": {}}) + "\n")
    stats = dedup.run_step(root, {"seed": 0})
    print(json.dumps(stats, indent=1))
    return stats
