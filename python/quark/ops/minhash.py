"""MinHash signatures of documents: the kernel under near-duplicate detection (quark.data.dedup).

The shingling, hashing and permutation family are documented in csrc/text/minhash.h;
quark.ops.reference.minhash is the same algorithm in plain Python.
"""
import numpy as np

from quark import _C

UNITS = ("word", "char")


def minhash(texts, num_perm=128, ngram=5, seed=0, unit="word"):
    """-> np.ndarray (len(texts), num_perm) uint64: the MinHash signature of every document.

    texts: a sequence of str (or UTF-8 bytes). unit "word": shingles of `ngram` consecutive
    lowercased ASCII-alphanumeric/non-ASCII words; "char": `ngram` consecutive code points.
    The fraction of equal columns of two rows estimates the Jaccard similarity of their shingle
    sets (standard error sqrt(J (1 - J) / num_perm)). Runs on quark.num_threads() threads with
    the GIL released.
    """
    if isinstance(texts, (str, bytes)):
        raise TypeError("texts must be a sequence of documents, not a single str/bytes; wrap it in a list")
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
    for name, v in (("num_perm", num_perm), ("ngram", ngram)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    texts = texts if isinstance(texts, list) else list(texts)
    out = np.empty((len(texts), int(num_perm)), dtype=np.uint64)
    _C.minhash(texts, out, int(num_perm), int(ngram), unit, int(seed))
    return out
