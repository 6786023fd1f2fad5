"""Prefix cache: the KV of prompt prefixes kept across requests, so a shared system prompt is prefilled once.

A prompt is cut into blocks of `block_size` tokens; block i is keyed by sha256(key of block i-1 + its
tokens), so a key names the whole prefix up to the block's end (vLLM's automatic prefix caching, Kwon et
al. 2023). Only full blocks are kept. A block holds a copy of its positions' KV, whatever tensors the
runner hands over (position on dim 0), so a hit is copied into the request's own slot and no block is ever
shared in place: eviction needs no reference counts. Blocks are evicted least recently used under a budget
in bytes; a chain is touched deepest block first, so a parent is never older than its children and
eviction takes leaves first (an evicted parent would strand its children).
"""
import hashlib
from collections import OrderedDict

import numpy as np
import torch


class PrefixCache:
    def __init__(self, budget_bytes, block_size=16):
        if budget_bytes <= 0 or block_size < 1:
            raise ValueError(f"budget_bytes and block_size must be positive, got {budget_bytes}, {block_size}")
        self.budget, self.block_size = budget_bytes, block_size
        self.blocks = OrderedDict()    # key -> tuple of tensors (block_size, ...); least recently used first
        self.nbytes = 0
        self.query_tokens = 0          # prompt tokens looked up
        self.hit_tokens = 0            # of which found in the cache

    def _keys(self, ids, n_blocks, space):
        key = hashlib.sha256(space).digest() if space else b""
        for i in range(n_blocks):
            block = np.asarray(ids[i * self.block_size:(i + 1) * self.block_size], dtype=np.int64)
            key = hashlib.sha256(key + block.tobytes()).digest()
            yield key

    def lookup(self, ids, limit, space=b""):
        """The longest cached prefix of ids, at most limit tokens -> (n tokens, tensors (n, ...)), or (0, None).
        space: bytes naming what else the KV depends on (a LoRA adapter); prefixes of other spaces never match."""
        chain = []
        for key in self._keys(ids, limit // self.block_size, space):
            if key not in self.blocks:
                break
            chain.append(key)
        self._touch(chain)
        n = len(chain) * self.block_size
        self.query_tokens += len(ids)
        self.hit_tokens += n
        if not chain:
            return 0, None
        return n, tuple(torch.cat(parts) for parts in zip(*(self.blocks[k] for k in chain)))

    def insert(self, ids, read, space=b""):
        """Keep the full blocks of ids whose KV was just computed (in space, as lookup's); read(start, end) ->
        tensors (end - start, ...) of those positions. Then evict down to the budget."""
        keys = list(self._keys(ids, len(ids) // self.block_size, space))
        new = [i for i, k in enumerate(keys) if k not in self.blocks]
        if new:
            B, first = self.block_size, new[0]
            kv = read(first * B, len(keys) * B)
            for i in new:
                block = tuple(t[(i - first) * B:(i - first + 1) * B].clone() for t in kv)
                self.blocks[keys[i]] = block
                self.nbytes += sum(t.nbytes for t in block)
        self._touch(keys)
        while self.nbytes > self.budget:
            _, block = self.blocks.popitem(last=False)
            self.nbytes -= sum(t.nbytes for t in block)

    def _touch(self, keys):
        for key in reversed(keys):   # the root ends most recent: leaves are evicted first
            self.blocks.move_to_end(key)

    def __len__(self):
        return len(self.blocks)
