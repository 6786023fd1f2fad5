"""quark.data.dedup: exact and MinHash-LSH near-duplicate removal on planted duplicates, agreement
with brute-force Jaccard, union-find against a plain reference, resume, and the band choice."""
import itertools
import json
import random

import numpy as np
import pytest

from quark.config import ConfigError
from quark.data import dedup
from quark.ops import reference


def _vocab(rng, n=3000):
    return ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9))) for _ in range(n)]


def _write_docs(run_dir, texts):
    (run_dir / "clean").mkdir(parents=True, exist_ok=True)
    with open(run_dir / "clean" / "docs.jsonl", "w") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"id": f"d{i}", "text": t, "source": "web", "meta": {"n": i}}) + "\n")


def _read(run_dir):
    return [json.loads(x) for x in (run_dir / "dedup" / "docs.jsonl").read_text().splitlines()]


def test_planted_duplicates(tmp_path):
    rng = random.Random(0)
    vocab = _vocab(rng)
    originals = [" ".join(rng.choice(vocab) for _ in range(120)) for _ in range(60)]
    texts = list(originals)
    exact = [t.upper().replace(" ", "  ") for t in originals[:10]]           # same after normalisation
    near = []
    for t in originals[10:30]:                                               # ~3% of words changed: J ~ 0.85+
        w = t.split()
        for j in rng.sample(range(len(w)), 1):
            w[j] = rng.choice(vocab)
        near.append(" ".join(w))
    texts += exact + near
    _write_docs(tmp_path, texts)
    stats = dedup.run_step(tmp_path, {"seed": 0, "chunk_docs": 17, "threshold": 0.7})
    kept = _read(tmp_path)
    assert [d["id"] for d in kept] == [f"d{i}" for i in range(60)]          # the first of each cluster survives
    assert stats["dropped"] == {"exact": 10, "near": 20} and stats["kept"] == 60
    assert all(d["meta"]["dup_cluster_size"] == (2 if i < 30 else 1) for i, d in enumerate(kept))
    assert kept[0]["meta"]["n"] == 0  # records pass through unchanged apart from the cluster size
    # rerun: keys are reused from dedup/work, output identical
    before = (tmp_path / "dedup" / "docs.jsonl").read_bytes()
    assert dedup.run_step(tmp_path, {"seed": 0, "chunk_docs": 17, "threshold": 0.7})["kept"] == 60
    assert (tmp_path / "dedup" / "docs.jsonl").read_bytes() == before


def test_clusters_agree_with_brute_force_jaccard(tmp_path):
    rng = random.Random(1)
    vocab = _vocab(rng, 400)
    texts = []
    for _ in range(40):
        base = [rng.choice(vocab) for _ in range(80)]
        texts.append(" ".join(base))
        for _ in range(rng.randint(0, 3)):  # variants from near-identical to unrelated
            w = list(base)
            for j in rng.sample(range(80), rng.choice([1, 2, 10, 40])):
                w[j] = rng.choice(vocab)
            texts.append(" ".join(w))
    _write_docs(tmp_path, texts)
    dedup.run_step(tmp_path, {"seed": 0, "threshold": 0.7})
    kept = {int(d["id"][1:]) for d in _read(tmp_path)}
    shingles = [reference.minhash_shingles(t, 5, "word") for t in texts]
    for i, j in itertools.combinations(range(len(texts)), 2):
        jac = len(shingles[i] & shingles[j]) / len(shingles[i] | shingles[j])
        if jac >= 0.9:
            assert j not in kept, (i, j, jac)  # the later of a very similar pair is always dropped
    # documents similar to nothing kept-earlier are never dropped
    for j in kept:
        for i in range(j):
            if i in kept:
                jac = len(shingles[i] & shingles[j]) / len(shingles[i] | shingles[j])
                assert jac < 0.9
    for j in range(len(texts)):
        best = max((len(shingles[i] & shingles[j]) / len(shingles[i] | shingles[j]) for i in range(len(texts)) if i != j),
                   default=0)
        if best < 0.3:
            assert j in kept


def test_union_find_matches_reference():
    rng = np.random.default_rng(0)
    n = 500
    cols = [rng.integers(0, 300, n).astype(np.uint64) for _ in range(3)]
    uf = dedup.UnionFind(n)
    for c in cols:
        uf.union_sorted_groups(c)
    roots = uf.roots()
    # reference: BFS over "shares a key in some column"
    label = list(range(n))
    changed = True
    while changed:
        changed = False
        for c in cols:
            first = {}
            for i in range(n):
                k = int(c[i])
                if k in first and label[first[k]] != label[i]:
                    lo = min(label[first[k]], label[i])
                    if label[first[k]] != lo or label[i] != lo:
                        label[first[k]] = label[i] = lo
                        changed = True
                first.setdefault(k, i)
    groups = {}
    for i in range(n):
        groups.setdefault(int(roots[i]), []).append(i)
    for r, members in groups.items():  # same partition as the reference; the root is the smallest member
        assert r == min(members)
        assert len({label[m] for m in members}) == 1 and label.count(label[r]) == len(members)


def test_optimal_bands_and_config():
    b, r = dedup.optimal_bands(0.8, 128)
    assert b * r <= 128 and 0.6 < (1 / b) ** (1 / r) < 0.9   # the S-curve's midpoint sits near the threshold
    with pytest.raises(ConfigError, match="dedup.threshold"):
        dedup.validate_config({"threshold": 1.5})
    with pytest.raises(ConfigError, match="dedup.unit"):
        dedup.validate_config({"unit": "line"})


def test_missing_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the clean step first"):
        dedup.run_step(tmp_path, {})
