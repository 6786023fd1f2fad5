"""quark.data.pack: the pack/ contract (flat memmap-able token files separated by <|eos|>, meta.json,
index), exact reconstruction of every document, deterministic split, resume after an interruption."""
import json

import numpy as np
import pytest

from quark.rundir import RunDir
from quark.config import ConfigError
from quark.data import pack, tokenizer


def _run_dir(tmp_path, n=300):
    (tmp_path / "dedup").mkdir(parents=True)
    texts = [f"Document {i}: " + " ".join(f"word{(i * j) % 97}" for j in range(i % 40 + 1)) + " ünï 🙂" for i in range(n)]
    with open(tmp_path / "dedup" / "docs.jsonl", "w") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"id": f"d{i}", "text": t, "source": "web", "meta": {}}) + "\n")
    tokenizer.run_step(tmp_path, {"vocab_size": 600, "seed": 0})
    return texts


def _docs(run_dir, split, meta):
    toks = np.memmap(run_dir / "pack" / f"{split}.bin", dtype=meta["dtype"], mode="r")
    idx = np.fromfile(run_dir / "pack" / f"{split}.idx", dtype=np.uint64)
    bounds = list(idx) + [len(toks)]
    return [toks[int(a):int(b)] for a, b in zip(bounds[:-1], bounds[1:])]


def test_contract_and_round_trip(tmp_path):
    texts = _run_dir(tmp_path)
    stats = pack.run_step(tmp_path, {"seed": 0, "batch_docs": 64, "val_fraction": 0.1})
    meta = json.loads((tmp_path / "pack" / "meta.json").read_text())
    assert {"dtype", "vocab_size", "train_tokens", "val_tokens", "eos_id", "bos_id"} <= set(meta)
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == RunDir(tmp_path).tokenizer().get_vocab_size() and meta["eos_id"] == 1 and meta["bos_id"] == 0
    assert (tmp_path / "pack" / "train.bin").stat().st_size == 2 * meta["train_tokens"]
    assert (tmp_path / "pack" / "val.bin").stat().st_size == 2 * meta["val_tokens"]
    assert meta["train_docs"] + meta["val_docs"] == len(texts) and 10 <= meta["val_docs"] <= 60
    tok = RunDir(tmp_path).tokenizer()
    got = []
    for split in ("train", "val"):
        for d in _docs(tmp_path, split, meta):
            assert d[-1] == meta["eos_id"] and meta["eos_id"] not in d[:-1]
            got.append(tok.decode(d[:-1].tolist(), skip_special_tokens=False))
    assert sorted(got) == sorted(texts)
    assert stats["docs"] == len(texts)


def test_split_is_deterministic_and_resume_is_exact(tmp_path):
    _run_dir(tmp_path)
    pack.run_step(tmp_path, {"seed": 0, "batch_docs": 50})
    want = {f: (tmp_path / "pack" / f).read_bytes() for f in ("train.bin", "val.bin", "train.idx", "val.idx")}
    # Simulate kill -9 mid-run: progress says 100 docs were committed, the files hold garbage after that.
    prog = json.loads((tmp_path / "pack" / "progress.json").read_text())
    assert prog["docs"] == 300
    (tmp_path / "pack" / "progress.json").unlink()
    pack.run_step(tmp_path, {"seed": 0, "batch_docs": 50})  # rebuild from scratch = same bytes
    assert all((tmp_path / "pack" / f).read_bytes() == b for f, b in want.items())
    partial = dict(prog)
    partial["docs"] = 100
    train_idx = np.fromfile(tmp_path / "pack" / "train.idx", dtype=np.uint64)
    val_idx = np.fromfile(tmp_path / "pack" / "val.idx", dtype=np.uint64)
    # recompute the committed sizes after 100 documents from the index
    ids = [f"d{i}" for i in range(100)]
    n_val = sum(pack.is_val(i, 0, 0.05) for i in ids)
    n_train = 100 - n_val
    t_tokens = int(train_idx[n_train]) if n_train < len(train_idx) else None
    v_tokens = int(val_idx[n_val]) if n_val < len(val_idx) else None
    partial["sizes"] = {"train.bin": 2 * t_tokens, "val.bin": 2 * v_tokens, "train.idx": 8 * n_train, "val.idx": 8 * n_val}
    partial["tokens"] = {"train": t_tokens, "val": v_tokens}
    partial["n_docs"] = {"train": n_train, "val": n_val}
    (tmp_path / "pack" / "progress.json").write_text(json.dumps(partial))
    with open(tmp_path / "pack" / "train.bin", "ab") as f:
        f.write(b"\xff" * 1001)  # a torn write after the checkpoint
    pack.run_step(tmp_path, {"seed": 0, "batch_docs": 50})
    assert all((tmp_path / "pack" / f).read_bytes() == b for f, b in want.items())


def test_errors(tmp_path):
    with pytest.raises(ConfigError, match="pack.val_fraction"):
        pack.validate_config({"val_fraction": 1.0})
    with pytest.raises(FileNotFoundError, match="run the dedup step first"):
        pack.run_step(tmp_path, {})
