"""Prefix cache: chained block keys (a block matches only after the same prefix), the longest-prefix lookup
under a limit, copies of only the missing blocks, and LRU eviction under the byte budget taking leaves first."""
import pytest
import torch

from quark.infer.prefix_cache import PrefixCache


class Positions:
    """A runner stand-in whose KV at position p is the value p (8 bytes a position), recording each read."""

    def __init__(self):
        self.reads = []

    def __call__(self, start, end):
        self.reads.append((start, end))
        return (torch.arange(start, end, dtype=torch.float64)[:, None],)


def test_lookup_finds_the_longest_cached_prefix_of_whole_blocks():
    cache, read = PrefixCache(1 << 20, block_size=4), Positions()
    a = list(range(10, 20))
    cache.insert(a, read)                       # blocks [10..13], [14..17]; the last 2 tokens are no full block
    assert len(cache) == 2 and read.reads == [(0, 8)] and cache.nbytes == 8 * 8
    n, (kv,) = cache.lookup(a, limit=9)
    assert n == 8 and kv[:, 0].tolist() == list(range(8))
    assert cache.lookup(a, limit=7)[0] == 4                                    # the limit rounds down to blocks
    assert cache.lookup(a[:4] + [1, 2, 3, 4, 5], limit=9)[0] == 4              # diverges inside block 2
    assert cache.lookup([9] + a[1:], limit=9) == (0, None)
    assert cache.lookup(a[4:8] + a[:4] + [1], limit=9) == (0, None)            # block 2's tokens, not after block 1
    assert (cache.query_tokens, cache.hit_tokens) == (10 + 10 + 9 + 10 + 9, 8 + 4 + 4)
    cache.insert(a[:8] + [7, 7, 7, 7], read)    # shares two blocks: only the third is read
    assert read.reads[-1] == (8, 12) and len(cache) == 3


def test_lru_eviction_under_the_budget_takes_leaves_first():
    block_bytes = 4 * 8
    cache, read = PrefixCache(3 * block_bytes, block_size=4), Positions()
    a, b = list(range(10, 18)), list(range(30, 38))
    cache.insert(a, read)
    cache.insert(b, read)                       # 4 blocks > budget of 3: a's leaf goes, its root stays
    assert cache.nbytes == 3 * block_bytes and len(cache) == 3
    assert cache.lookup(a, limit=8)[0] == 4 and cache.lookup(b, limit=8)[0] == 8
    cache.lookup(a, limit=8)                    # a's root is now the most recent: b's leaf is next out
    cache.insert(a, read)                       # re-reads only a's missing leaf
    assert read.reads[-1] == (4, 8)
    assert cache.lookup(a, limit=8)[0] == 8 and cache.lookup(b, limit=8)[0] == 4
    tiny = PrefixCache(block_bytes - 1, block_size=4)
    tiny.insert(a, read)                        # nothing fits: everything evicted, nothing breaks
    assert len(tiny) == 0 and tiny.nbytes == 0 and tiny.lookup(a, limit=8) == (0, None)
    with pytest.raises(ValueError, match="budget_bytes"):
        PrefixCache(0)


def test_key_spaces_never_share_a_prefix():
    """KV computed with a LoRA adapter lives in its own key space: the same tokens in another space miss."""
    cache, read = PrefixCache(1 << 20, block_size=4), Positions()
    a = list(range(10, 19))
    cache.insert(a, read, b"adapter:x")
    assert cache.lookup(a, 8)[0] == 0 and cache.lookup(a, 8, b"adapter:y")[0] == 0
    assert cache.lookup(a, 8, b"adapter:x")[0] == 8
    cache.insert(a, read)                       # the base's own blocks: read again, kept beside x's
    assert read.reads == [(0, 8), (0, 8)] and len(cache) == 4 and cache.lookup(a, 8)[0] == 8
