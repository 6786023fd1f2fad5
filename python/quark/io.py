"""Crash-safe file writes: temp file in the same directory, fsync, rename, fsync the directory.
A reader sees the old file or the new one, never a torn one. atomic_dir does the same for a whole
directory (a model: weights, config and tokenizer belong together)."""
import hashlib
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_open(path, mode="wb"):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def fsync_dir(path):
    """Make the directory's entries (files created, renamed or removed in it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_dir(path):
    """Write a directory as a whole: yields an empty temporary sibling to fill; on success every
    file in it is fsynced and it takes the place of `path`, so a reader (or a crash) sees the old
    directory or the new one, never files of both. POSIX has no atomic swap of two directories, so
    replacing an existing one takes two renames: a crash between them leaves no `path` (a clear
    "missing" error, not a mix) and the old copy in the hidden sibling .NAME.*.old, which the next
    write of `path` removes along with any other leftovers of interrupted writes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for name in os.listdir(path.parent):
        if re.fullmatch(rf"\.{re.escape(path.name)}\.[0-9a-f]{{12}}\.(tmp|old)", name):
            shutil.rmtree(path.parent / name)
    tmp = path.parent / f".{path.name}.{os.urandom(6).hex()}.tmp"
    tmp.mkdir()   # not mkdtemp: its 0700 mode would become the model directory's
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        fsync_dir(tmp)
        old = tmp.with_suffix(".old")
        if path.exists():
            os.rename(path, old)
        os.rename(tmp, path)
        fsync_dir(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path, data):
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path, text):
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=1, default=str))


def read_jsonl(path):
    """Yield (line_number, record) from a JSONL file; a malformed line raises ValueError naming it."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None


def sha256_file(path):
    """Hex SHA-256 of a file's content, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()
