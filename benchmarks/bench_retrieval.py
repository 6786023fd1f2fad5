"""Hybrid search latency at 100k chunks: quark.retrieval.Store (SQLite FTS5 BM25 + quark.search.Index
HNSW + reciprocal-rank fusion) vs the same pipeline with hnswlib as the dense side, and the parts alone.

Corpus: synthetic documents of Zipf-distributed words (a 20k-word vocabulary), 4 chunks each, embedded
with the HashingEmbedder (256-d) so building 100k chunks takes seconds, not hours; queries are
8-word windows of random chunks. Latency is per query (a call runs a batch of queries one by one,
as a server would). Every row is the median over interleaved calls; dense recall@10 of each HNSW
against exact search is printed beside, so speed is never bought with recall.
"""
import tempfile
import time

import numpy as np

from benchmarks.harness import interleaved, summarize
from quark.retrieval.embed import HashingEmbedder
from quark.retrieval.store import Store

DIM = 256


def make_corpus(n_chunks, seed=0, words_per_chunk=48, vocab=20_000):
    rng = np.random.default_rng(seed)
    words = np.array([f"w{i}" for i in range(vocab)])
    ranks = np.minimum(rng.zipf(1.2, size=n_chunks * words_per_chunk), vocab) - 1
    tokens = words[ranks].reshape(n_chunks, words_per_chunk)
    texts = [" ".join(row) for row in tokens]
    docs = []
    for d in range(n_chunks // 4):   # chunk_tokens = words_per_chunk: each text is one chunk
        docs.append({"id": f"d{d}", "text": "\n".join(texts[4 * d:4 * d + 4]), "source": f"s{d % 10}",
                     "meta": {"shard": d % 10}})
    queries = [" ".join(tokens[i, s:s + 8]) for i, s in zip(rng.integers(0, n_chunks, 256), rng.integers(0, 40, 256))]
    return docs, queries


def build(n_chunks, path):
    docs, queries = make_corpus(n_chunks)
    t0 = time.perf_counter()
    st = Store(path, HashingEmbedder(DIM), None, chunk_tokens=48, chunk_overlap=0, autosave=False)
    for b in range(0, len(docs), 2000):
        st.upsert(docs[b:b + 2000])
    st.flush()
    return st, queries, time.perf_counter() - t0


def rrf(lists, k=10, rrf_k=60):
    score = {}
    for lst in lists:
        for r, cid in enumerate(lst, 1):
            score[cid] = score.get(cid, 0.0) + 1.0 / (rrf_k + r)
    return sorted(score, key=lambda c: (-score[c], c))[:k]


def compare(quick=False):
    import hnswlib
    n = 20_000 if quick else 100_000
    tmp = tempfile.TemporaryDirectory()
    st, queries, build_s = build(n, tmp.name)
    ids = np.asarray([c for c, _, _ in st.chunks()], np.int64)
    vecs = st._vectors(ids.tolist())
    t0 = time.perf_counter()
    peer = hnswlib.Index(space="ip", dim=DIM)
    peer.init_index(max_elements=len(ids), M=16, ef_construction=200, random_seed=0)
    peer.add_items(vecs, ids)
    peer.set_ef(64)
    peer_build_s = time.perf_counter() - t0
    qv = st.embedder.embed(queries)
    batch = queries[:32] if quick else queries[:64]
    qb = qv[: len(batch)]

    # Recall of each dense side against exact inner-product search.
    exact = np.argsort(-(qv @ vecs.T), axis=1)[:, :10]
    exact_ids = ids[exact]
    ours = np.stack([st.dense.search(q, 10)[1] for q in qv])
    theirs = peer.knn_query(qv, k=10)[0]
    recall = {"quark.search hnsw": float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ours, exact_ids)])),
              "hnswlib": float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(theirs, exact_ids)]))}

    def hybrid_quark():
        for q in batch:
            st.search(q, k=10, mode="hybrid")

    def hybrid_hnswlib():   # the same pipeline, dense side from hnswlib
        for q, v in zip(batch, qb):
            bm = [c for c, _ in st.search_bm25(q, 50)]
            dn = peer.knn_query(v[None], k=50)[0][0].tolist()
            st._hits([(c, 0.0) for c in rrf([bm, dn])], {})

    def dense_quark():
        for v in qb:
            st.search_dense(v, 50)

    def dense_hnswlib():
        for v in qb:
            peer.knn_query(v[None], k=50)

    def bm25_fts5():
        for q in batch:
            st.search_bm25(q, 50)

    def hybrid_filtered():   # 10% of the documents allowed
        for q in batch:
            st.search(q, k=10, mode="hybrid", filter={"shard": 3})

    rows = []
    extra = {"chunks": n, "dim": DIM, "build_s": round(build_s, 1), "hnswlib_build_s": round(peer_build_s, 1),
             "recall@10": recall, "queries_per_call": len(batch)}
    times = interleaved({"quark hybrid": hybrid_quark, "hybrid w/ hnswlib dense": hybrid_hnswlib},
                        repeats=3 if quick else 7, warmup=1)
    rows += summarize("retrieval", f"hybrid k=10 (50+50 cand.) n={n}", _per_query(times, len(batch)), extra=extra)
    times = interleaved({"quark.search hnsw": dense_quark, "hnswlib": dense_hnswlib}, repeats=3 if quick else 7, warmup=1)
    rows += summarize("retrieval", f"dense k=50 n={n} d={DIM}", _per_query(times, len(batch)), extra=extra)
    times = interleaved({"quark fts5 bm25": bm25_fts5, "quark hybrid filtered 10%": hybrid_filtered},
                        repeats=3 if quick else 7, warmup=1)
    rows += summarize("retrieval", f"bm25 k=50 / filtered hybrid n={n}", _per_query(times, len(batch)), extra=extra)
    st.close()
    tmp.cleanup()
    print(f"retrieval: build {build_s:.1f}s ({n} chunks; hnswlib alone {peer_build_s:.1f}s), recall@10 {recall}")
    return rows


def _per_query(times, n):
    return {k: [t / n for t in v] for k, v in times.items()}


def test_hybrid_search_20k(benchmark, tmp_path):
    st, queries, _ = build(20_000, tmp_path / "s")
    benchmark(st.search, queries[0], 10, "hybrid")
    st.close()
