"""TokenLoader: determinism, shifted targets, rank slicing of the global batch, resume (also across
world sizes), epochs, and clear errors for bad files."""
import json

import numpy as np
import pytest
import torch

from quark.data.loader import TokenLoader, eval_batches


@pytest.fixture
def bin16(tmp_path):
    path = tmp_path / "train.bin"
    np.arange(5000, dtype=np.uint16).tofile(path)   # token i == i, so windows are easy to check
    return path


def take(loader, n):
    return [loader.next_batch() for _ in range(n)]


def test_shapes_and_shift(bin16):
    x, y = TokenLoader(bin16, "uint16", 4, 16, seed=1).next_batch()
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, -1], x[:, -1] + 1)
    assert torch.equal(x[:, 1:] - x[:, :-1], torch.ones(4, 15, dtype=torch.int64))   # contiguous windows


def test_deterministic_and_seed_dependent(bin16):
    a = take(TokenLoader(bin16, "uint16", 4, 16, seed=3), 5)
    b = take(TokenLoader(bin16, "uint16", 4, 16, seed=3), 5)
    c = take(TokenLoader(bin16, "uint16", 4, 16, seed=4), 5)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(a, b))
    assert not all(torch.equal(p[0], q[0]) for p, q in zip(a, c))


def test_ranks_partition_the_global_batch(bin16):
    whole = take(TokenLoader(bin16, "uint16", 6, 16, seed=0), 4)
    r0 = take(TokenLoader(bin16, "uint16", 3, 16, seed=0, rank=0, world_size=2), 4)
    r1 = take(TokenLoader(bin16, "uint16", 3, 16, seed=0, rank=1, world_size=2), 4)
    for (x, _), (x0, _), (x1, _) in zip(whole, r0, r1):
        assert torch.equal(x, torch.cat([x0, x1]))


def test_resume_matches_uninterrupted(bin16):
    ref = take(TokenLoader(bin16, "uint16", 4, 16, seed=7), 60)   # crosses epoch boundaries (~78 windows/epoch)
    first = TokenLoader(bin16, "uint16", 4, 16, seed=7)
    take(first, 25)
    state = json.loads(json.dumps(first.state_dict()))          # JSON round trip, as in checkpoints
    second = TokenLoader(bin16, "uint16", 4, 16, seed=7)
    second.load_state_dict(state)
    for (x, _), (x2, _) in zip(ref[25:], take(second, 35)):
        assert torch.equal(x, x2)


def test_resume_under_another_world_size(bin16):
    ref = take(TokenLoader(bin16, "uint16", 4, 16, seed=2), 6)
    a = TokenLoader(bin16, "uint16", 2, 16, seed=2, rank=0, world_size=2)
    take(a, 3)
    resumed = TokenLoader(bin16, "uint16", 4, 16, seed=2)
    resumed.load_state_dict(a.state_dict())
    for (x, _), (x2, _) in zip(ref[3:], take(resumed, 3)):
        assert torch.equal(x, x2)


def test_epochs_cover_windows_without_repeats(bin16):
    loader = TokenLoader(bin16, "uint16", 1, 50, seed=0)
    starts = [int(loader.next_batch()[0][0, 0]) for _ in range(98)]   # one epoch: (5000 - 1 - off) // 50 >= 98
    assert len(set(starts)) == 98 and loader.epoch == 0
    take(loader, 2)
    assert loader.epoch == 1


def test_uint32_and_large_ids(tmp_path):
    path = tmp_path / "t.bin"
    (np.arange(3000, dtype=np.uint32) + 70000).tofile(path)
    x, _ = TokenLoader(path, "uint32", 2, 8).next_batch()
    assert int(x.min()) >= 70000


def test_eval_batches_fixed(bin16):
    a, b = eval_batches(bin16, "uint16", 2, 16, 3), eval_batches(bin16, "uint16", 2, 16, 3)
    assert len(a) == 3 and all(torch.equal(p[0], q[0]) for p, q in zip(a, b))


def test_eval_batches_small_or_empty_split(tmp_path):
    small = tmp_path / "val.bin"
    np.arange(100, dtype=np.uint16).tofile(small)            # room for 5 windows of 16, not 8
    batches = eval_batches(small, "uint16", 8, 16, 3)
    assert batches and batches[0][0].shape[0] < 8
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    assert eval_batches(empty, "uint16", 8, 16, 3) == []


def test_errors(tmp_path, bin16):
    with pytest.raises(FileNotFoundError, match="pack"):
        TokenLoader(tmp_path / "missing.bin", "uint16", 2, 8)
    with pytest.raises(ValueError, match="dtype"):
        TokenLoader(bin16, "int8", 2, 8)
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\x00" * 7)
    with pytest.raises(ValueError, match="not a multiple"):
        TokenLoader(odd, "uint16", 2, 8)
    with pytest.raises(ValueError, match="too few"):
        TokenLoader(bin16, "uint16", 64, 128)
    with pytest.raises(ValueError, match="rank"):
        TokenLoader(bin16, "uint16", 2, 8, rank=2, world_size=2)
    loader = TokenLoader(bin16, "uint16", 2, 8, seed=1)
    with pytest.raises(ValueError, match="seed"):
        TokenLoader(bin16, "uint16", 2, 8, seed=2).load_state_dict(loader.state_dict())
