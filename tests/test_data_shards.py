"""quark.data.shards: the committed position survives a power cut (directory entries fsynced before
the caller commits) and a shard that lost committed bytes is refused, not padded with zeros."""
import os
import stat

import pytest

from quark.data.shards import AppendWriter, ShardWriter, iter_records, shard_paths


@pytest.fixture
def fsyncs(monkeypatch):
    """Every fsync the code under test makes -> list of (is_directory, inode)."""
    calls, real = [], os.fsync

    def spy(fd):
        st = os.fstat(fd)
        calls.append((stat.S_ISDIR(st.st_mode), st.st_ino))
        return real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    return calls


def test_a_new_shard_is_in_the_directory_before_its_position_is_returned(tmp_path, fsyncs):
    w = ShardWriter(tmp_path, "pages", max_records=1)
    dir_sync = (True, os.stat(tmp_path).st_ino)
    w.write({"i": 0})
    w.sync()
    assert dir_sync in fsyncs   # pages-00000.jsonl was created
    fsyncs.clear()
    w.write({"i": 1})           # rotates to pages-00001.jsonl
    pos = w.sync()
    assert pos["shard"] == 1 and dir_sync in fsyncs
    fsyncs.clear()
    w.sync()
    assert dir_sync not in fsyncs   # nothing new in the directory: the file's own fsync is enough
    w.close()
    a = AppendWriter(tmp_path / "docs.jsonl")
    a.write({"i": 0})
    a.sync()
    assert dir_sync in fsyncs


def test_a_shard_shorter_than_its_committed_position_is_refused(tmp_path):
    w = ShardWriter(tmp_path, "pages", max_records=10)
    for i in range(5):
        w.write({"i": i, "text": "x" * 100})
    pos = w.sync()
    w.write({"i": 5})                # after the checkpoint: dropped on reopen
    w.close()
    ShardWriter(tmp_path, "pages", 10, pos).close()
    assert [r["i"] for r in iter_records(shard_paths(tmp_path, "pages"))] == [0, 1, 2, 3, 4]
    path = shard_paths(tmp_path, "pages")[0]
    os.truncate(path, pos["offset"] - 150)   # committed bytes lost (an old backup, a disk error)
    with pytest.raises(ValueError, match=r"pages-00000.jsonl is \d+ bytes but \d+ bytes of it were committed"):
        ShardWriter(tmp_path, "pages", 10, pos)
    assert b"\0" not in path.read_bytes() and os.path.getsize(path) == pos["offset"] - 150   # not padded
    path.unlink()
    with pytest.raises(ValueError, match="is 0 bytes"):
        ShardWriter(tmp_path, "pages", 10, pos)
    docs = tmp_path / "docs.jsonl"
    docs.write_bytes(b'{"a": 1}\n')
    with pytest.raises(ValueError, match="docs.jsonl is 9 bytes but 100 bytes"):
        AppendWriter(docs, 100)
