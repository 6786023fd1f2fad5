import os
import subprocess
import sys

import pytest

from quark.io import atomic_open, atomic_write_json, atomic_write_text, read_jsonl


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    p = tmp_path / "sub" / "a.txt"
    atomic_write_text(p, "one")
    atomic_write_text(p, "two")
    assert p.read_text() == "two"
    assert os.listdir(p.parent) == ["a.txt"]


def test_failed_write_keeps_the_old_file(tmp_path):
    p = tmp_path / "a.json"
    atomic_write_json(p, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_open(p, "w") as f:
            f.write('{"v": 2, "trunc')
            raise RuntimeError("disk full")
    assert p.read_text().strip().startswith("{") and os.listdir(tmp_path) == ["a.json"]


def test_killed_writer_never_leaves_a_torn_file(tmp_path):
    p = tmp_path / "big.txt"
    atomic_write_text(p, "old")
    code = ("import os, sys; from quark import io\n"
            "with io.atomic_open(sys.argv[1], 'wb') as f:\n"
            "    f.write(b'x' * 1000); f.flush(); os._exit(9)\n")
    r = subprocess.run([sys.executable, "-c", code, str(p)], timeout=60)
    assert r.returncode == 9
    assert p.read_text() == "old"


def test_read_jsonl_names_the_bad_line(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"a": 1}\n\n{"a": 2\n')
    it = read_jsonl(p)
    assert next(it) == (1, {"a": 1})
    with pytest.raises(ValueError, match=r"x.jsonl:3: not valid JSON"):
        next(it)
