"""Perplexity and bits-per-byte on held-out text.

bits/byte = total NLL (nats) / ln 2 / UTF-8 bytes of the scored text: unlike perplexity it does
not depend on the tokenizer, so models with different vocabularies compare fairly.
"""
import math

import numpy as np


def evaluate_tokens(lm, ids, max_tokens=None, windows=None):
    """Perplexity and bits/byte of a token sequence (e.g. a slice of pack/val.bin). windows: its
    lm.window_nll(ids), when the caller already has them (the eval step keeps them as gate items)."""
    ids = np.asarray(ids[: max_tokens or len(ids)], dtype=np.int64)
    windows = lm.window_nll(ids) if windows is None else windows
    nll, count = sum(n for n, _ in windows), sum(c for _, c in windows)
    n_bytes = len(lm.decode(ids.tolist()).encode("utf-8"))
    return {"loss": nll / max(count, 1), "perplexity": math.exp(min(nll / max(count, 1), 50.0)),
            "bits_per_byte": nll / math.log(2) / max(n_bytes, 1), "tokens": int(count), "bytes": int(n_bytes)}


def evaluate_text(lm, text):
    return evaluate_tokens(lm, lm.encode(text))
