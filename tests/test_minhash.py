"""quark.ops.minhash: bit-exact against the Python oracle on every ISA path, Jaccard estimates
against the exact Jaccard and against datasketch within sampling error, and clear errors."""
import random
import threading

import numpy as np
import pytest

import quark
from quark.ops import minhash, reference

ISAS = [i for i in ("scalar", "avx2", "avx512") if quark._runtime.ISA_LEVELS.index(i) <= quark._runtime.ISA_LEVELS.index(quark.info()["isa_detected"])]


def _docs(n, words=60, seed=0, vocab=400):
    rng = random.Random(seed)
    voc = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(1, 8))) for _ in range(vocab)]
    return [" ".join(rng.choice(voc) for _ in range(rng.randint(0, words))) for _ in range(n)]


ODD_DOCS = ["", " ,;; ", "one", "Two words", "Hello, World! hello world", "héllo wörld — ünïcode 日本語 テキスト ok",
            "x" * 257, "tab\tsep\nnew line\r\nand CAPS and digits 123 4567", "🙂 emoji 🙂 emoji 🙂"] + _docs(13, seed=1)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("unit", ["word", "char"])
@pytest.mark.parametrize("num_perm,ngram", [(1, 1), (7, 3), (33, 5), (128, 5), (200, 2)])
def test_matches_reference(isa, unit, num_perm, ngram):
    want = reference.minhash(ODD_DOCS, num_perm=num_perm, ngram=ngram, seed=3, unit=unit)
    with quark.isa(isa):
        got = minhash(ODD_DOCS, num_perm=num_perm, ngram=ngram, seed=3, unit=unit)
    assert got.dtype == np.uint64 and got.shape == (len(ODD_DOCS), num_perm)
    np.testing.assert_array_equal(got, want)


def test_bytes_equal_str_and_empty_is_max():
    docs = ["some text here for hashing", "ünïcode too"]
    np.testing.assert_array_equal(minhash(docs), minhash([d.encode() for d in docs]))
    assert (minhash([""])[0] == np.iinfo(np.uint64).max).all()
    assert minhash([]).shape == (0, 128)


def test_seed_and_normalisation():
    a, b = minhash(["The Quick, brown fox!"]), minhash(["the quick brown   FOX"])
    np.testing.assert_array_equal(a, b)  # word mode lowercases ASCII and ignores punctuation/spacing
    assert (minhash(["the quick brown fox"], seed=1) != a).any()


def test_threads_do_not_change_result():
    docs = _docs(300, words=200, seed=2)
    before = quark.num_threads()
    try:
        quark.set_num_threads(1)
        one = minhash(docs)
        quark.set_num_threads(2)
        two = minhash(docs)
    finally:
        quark.set_num_threads(before)
    np.testing.assert_array_equal(one, two)


def test_runs_concurrently_from_threads():
    """The GIL is released: several Python threads may call it at once and get the same answer."""
    docs = _docs(200, words=100, seed=4)
    want = minhash(docs)
    results = [None] * 4

    def work(i):
        results[i] = minhash(docs)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        np.testing.assert_array_equal(r, want)


def _pairs_with_overlap(rng, n_pairs=60, size=300):
    """Pairs of documents of random 8-letter words whose word sets overlap by a chosen amount.
    Random words keep the shingle sets of different pairs unrelated, so their errors are independent."""
    def word():
        return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(8))

    pairs = []
    for _ in range(n_pairs):
        shared = rng.randint(0, size)
        base = [word() for _ in range(shared)]
        a = base + [word() for _ in range(size - shared)]
        b = base + [word() for _ in range(rng.randint(0, size))]
        pairs.append((" ".join(a), " ".join(b)))
    return pairs


def _estimate(sig_a, sig_b):
    return float((sig_a == sig_b).mean())


@pytest.mark.parametrize("unit", ["word", "char"])
def test_estimate_agrees_with_exact_jaccard(unit):
    rng = random.Random(5)
    k = 256
    pairs = _pairs_with_overlap(rng)
    sigs = minhash([t for p in pairs for t in p], num_perm=k, ngram=1 if unit == "word" else 4, unit=unit)
    errors = []
    for i, (a, b) in enumerate(pairs):
        sa = reference.minhash_shingles(a, 1 if unit == "word" else 4, unit)
        sb = reference.minhash_shingles(b, 1 if unit == "word" else 4, unit)
        j = len(sa & sb) / len(sa | sb)
        est = _estimate(sigs[2 * i], sigs[2 * i + 1])
        sd = max((j * (1 - j) / k) ** 0.5, 1 / k)
        assert abs(est - j) <= 4.5 * sd, (i, j, est)
        errors.append(est - j)
    assert abs(np.mean(errors)) < 0.01  # unbiased: the mean error shrinks like sd / sqrt(pairs)


def test_agrees_with_datasketch():
    datasketch = pytest.importorskip("datasketch")
    rng = random.Random(6)
    k = 128
    pairs = _pairs_with_overlap(rng, n_pairs=40, size=200)
    sigs = minhash([t for p in pairs for t in p], num_perm=k, ngram=1)
    for i, (a, b) in enumerate(pairs):
        ms = []
        for t in (a, b):
            m = datasketch.MinHash(num_perm=k, seed=1)
            m.update_batch([w.encode() for w in set(t.split())])
            ms.append(m)
        theirs = ms[0].jaccard(ms[1])
        ours = _estimate(sigs[2 * i], sigs[2 * i + 1])
        wa, wb = set(a.split()), set(b.split())
        j = len(wa & wb) / len(wa | wb)
        # Two independent estimators of the same J: their difference has variance 2 J (1 - J) / k.
        assert abs(ours - theirs) <= 4.5 * max((2 * j * (1 - j) / k) ** 0.5, 1 / k), (i, j, ours, theirs)


def test_an_ngram_longer_than_every_document_is_the_whole_document():
    # Regression (fuzz): the kernel built a table of `ngram` multipliers up front, so ngram = 2^31 - 1
    # allocated 16 GiB before looking at a 3-word document. A document shorter than ngram units is
    # one shingle of all of them, whatever ngram is.
    docs = ["alpha beta gamma", "x", ""]
    for unit in ("word", "char"):
        assert np.array_equal(minhash(docs, 32, 2**31 - 1, unit=unit), minhash(docs, 32, 16, unit=unit))


def test_errors_name_the_problem():
    with pytest.raises(TypeError, match="single str"):
        minhash("a document")
    with pytest.raises(ValueError, match="unit"):
        minhash(["x"], unit="line")
    with pytest.raises(ValueError, match="num_perm"):
        minhash(["x"], num_perm=0)
    with pytest.raises(ValueError, match="ngram"):
        minhash(["x"], ngram=-1)
    with pytest.raises(ValueError, match="seed"):
        minhash(["x"], seed=-1)
    with pytest.raises(TypeError, match=r"texts\[1\] must be str or bytes"):
        minhash(["ok", 3])
    with pytest.raises(UnicodeEncodeError):
        minhash(["lone surrogate \ud800"])
