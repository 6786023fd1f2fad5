"""Deterministic batches of (x, y) token windows from a packed flat token file (pack/train.bin).

The file is opened as a read-only np.memmap, so it may be larger than RAM: only the windows of the
current batch are paged in. Each epoch draws a random offset in [0, seq_len) and a permutation of
the non-overlapping windows that start there, both from (seed, epoch); a *global* batch is
batch_size * world_size consecutive windows of that permutation and rank r takes its slice
[r * batch_size, (r + 1) * batch_size). So 2 ranks of batch 4 see exactly the windows that one
process of batch 8 sees, which is what lets distributed training match single-process training.

The position is counted in windows consumed within the epoch, not in batches, so a state saved by
one world size resumes under another (state_dict()/load_state_dict(), JSON-able).
"""
from pathlib import Path

import numpy as np
import torch

DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


class TokenLoader:
    def __init__(self, bin_path, dtype, batch_size, seq_len, seed=0, rank=0, world_size=1):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size} and {seq_len}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        path = Path(bin_path)
        if not path.exists():
            raise FileNotFoundError(f"token file {path} does not exist (run the pack step first)")
        itemsize = np.dtype(DTYPES[dtype]).itemsize
        size = path.stat().st_size
        if size % itemsize:
            raise ValueError(f"{path}: size {size} bytes is not a multiple of {itemsize} ({dtype}); wrong dtype or truncated file")
        self.path, self.dtype = path, dtype
        self.tokens = np.memmap(path, dtype=DTYPES[dtype], mode="r") if size else np.zeros(0, DTYPES[dtype])
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.rank, self.world_size = rank, world_size
        self.global_batch = batch_size * world_size
        # A window needs seq_len + 1 tokens (inputs and the shifted targets); the offset may eat seq_len - 1.
        if (len(self.tokens) - seq_len) // seq_len < self.global_batch:
            raise ValueError(f"{path} holds {len(self.tokens)} tokens: too few for one batch of "
                             f"{self.global_batch} windows of {seq_len} + 1 tokens; lower batch_size or seq_len")
        self.epoch = 0
        self.consumed = 0            # windows of this epoch already handed out (all ranks together)
        self._order_epoch = None

    def _epoch_order(self):
        """(offset, permutation of window indices) of the current epoch, cached."""
        if self._order_epoch != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch])
            offset = int(rng.integers(self.seq_len))
            n_windows = (len(self.tokens) - 1 - offset) // self.seq_len
            self._order = (offset, rng.permutation(n_windows))
            self._order_epoch = self.epoch
        return self._order

    def next_batch(self):
        """-> x, y int64 (batch_size, seq_len); y is x shifted left by one token."""
        offset, order = self._epoch_order()
        if self.consumed + self.global_batch > len(order):   # drop the ragged tail, start a new epoch
            self.epoch, self.consumed = self.epoch + 1, 0
            offset, order = self._epoch_order()
        first = self.consumed + self.rank * self.batch_size
        starts = offset + order[first:first + self.batch_size] * self.seq_len
        self.consumed += self.global_batch
        T = self.seq_len
        win = np.stack([np.asarray(self.tokens[s:s + T + 1], dtype=np.int64) for s in starts])  # (B, T+1)
        win = torch.from_numpy(win)
        return win[:, :-1], win[:, 1:]

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self):
        return {"seed": self.seed, "epoch": self.epoch, "consumed": self.consumed, "seq_len": self.seq_len,
                "path": str(self.path), "tokens": len(self.tokens)}

    def load_state_dict(self, state):
        here = {"seed": self.seed, "seq_len": self.seq_len, "tokens": len(self.tokens)}
        for key, have in here.items():
            if state.get(key) != have:
                raise ValueError(f"loader state does not match this loader: {key} is {state.get(key)!r} "
                                 f"in the state but {have!r} here (different data or settings)")
        # Windows are counted one by one, so a position saved under another world size resumes here too.
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])


def eval_batches(bin_path, dtype, batch_size, seq_len, max_batches, rank=0, world_size=1):
    """The fixed validation batches: the first max_batches of a seed-0 loader (identical every call).
    A validation split too small for one batch gets smaller batches; an empty one gives []."""
    path = Path(bin_path)
    tokens = path.stat().st_size // np.dtype(DTYPES[dtype]).itemsize if path.exists() else 0
    fit = (tokens - seq_len) // seq_len // world_size          # windows per rank that surely fit
    batch_size = min(batch_size, fit)
    if batch_size < 1 or max_batches < 1:
        return []
    loader = TokenLoader(path, dtype, batch_size, seq_len, seed=0, rank=rank, world_size=world_size)
    n = min(max_batches, len(loader._epoch_order()[1]) // loader.global_batch)
    return [loader.next_batch() for _ in range(n)]
