"""JSONL shards that survive kill -9: records are appended to dir/<prefix>-00000.jsonl,
<prefix>-00001.jsonl, ... and a *position* (shard, byte offset, records in shard) is handed to the
caller after an fsync (of the file, and of the directory when the shard is new, so the committed
position never names a shard whose directory entry a power cut can lose). The caller stores the
position in the same atomic commit as its own progress (a SQLite transaction, an atomically
replaced progress file). Reopening at a position truncates everything written after it, so work
done after the last commit is redone exactly once: nothing is lost and nothing is duplicated. A
file shorter than its committed position lost committed data and is refused (truncate() would
silently pad it with zeros).
"""
import json
import os
from pathlib import Path

from quark.io import fsync_dir

START = {"shard": 0, "offset": 0, "records": 0}


def shard_path(directory, prefix, k):
    return Path(directory) / f"{prefix}-{k:05d}.jsonl"


def shard_paths(directory, prefix):
    return sorted(Path(directory).glob(f"{prefix}-[0-9][0-9][0-9][0-9][0-9].jsonl"))


def iter_records(paths):
    """Yield every record of the given JSONL files in order; a malformed line raises ValueError naming it."""
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None


def open_at(path, offset):
    """`path` opened for appending at a committed byte offset, everything after it dropped."""
    path = Path(path)
    size = path.stat().st_size if path.exists() else 0
    if size < offset:
        raise ValueError(f"{path} is {size} bytes but {offset} bytes of it were committed: data written before "
                         f"the last checkpoint is gone (a restore from an older copy, or a disk error). Restore "
                         f"the file, or delete the step's output directory to redo the step from scratch")
    f = open(path, "ab")
    f.truncate(offset)
    f.seek(offset)
    return f


class ShardWriter:
    def __init__(self, directory, prefix, max_records, position=None):
        if max_records < 1:
            raise ValueError(f"max_records must be >= 1, got {max_records}")
        self.directory, self.prefix, self.max_records = Path(directory), prefix, max_records
        self.directory.mkdir(parents=True, exist_ok=True)
        pos = dict(position or START)
        for path in shard_paths(self.directory, prefix):  # shards begun after the checkpoint
            if int(path.stem.rsplit("-", 1)[1]) > pos["shard"]:
                path.unlink()
        self.shard, self.records = pos["shard"], pos["records"]
        path = shard_path(self.directory, prefix, self.shard)
        self._new = not path.exists()   # a directory entry that sync() must make durable
        self._f = open_at(path, pos["offset"])  # drops bytes written after the checkpoint (maybe a torn line)

    def write(self, record):
        if self.records >= self.max_records:
            self._f.close()
            self.shard, self.records = self.shard + 1, 0
            self._f = open(shard_path(self.directory, self.prefix, self.shard), "wb")
            self._new = True
        self._f.write(json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n")
        self.records += 1

    def sync(self):
        """Flush and fsync; -> the position to commit together with the caller's progress."""
        self._f.flush()
        os.fsync(self._f.fileno())
        if self._new:
            fsync_dir(self.directory)
            self._new = False
        return {"shard": self.shard, "offset": self._f.tell(), "records": self.records}

    def close(self):
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AppendWriter:
    """One JSONL file with the same checkpoint discipline: reopened at a committed byte offset,
    everything after it is truncated."""

    def __init__(self, path, offset=0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._new = not self.path.exists()
        self._f = open_at(self.path, offset)

    def write(self, record):
        self._f.write(json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n")

    def sync(self):
        self._f.flush()
        os.fsync(self._f.fileno())
        if self._new:
            fsync_dir(self.path.parent)
            self._new = False
        return self._f.tell()

    def close(self):
        self._f.close()


def fingerprint(*parts):
    """A short hash of JSON-able parts (settings, input file sizes): a step's saved progress is
    reused only while its inputs and settings have this same fingerprint."""
    import hashlib
    blob = json.dumps(parts, sort_keys=True, default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


def file_state(paths):
    """(name, size, mtime_ns) of each file: changes whenever an upstream step rewrote its output."""
    out = []
    for p in paths:
        st = Path(p).stat()
        out.append((Path(p).name, st.st_size, st.st_mtime_ns))
    return out
