"""Shared by the train tests: a run directory with packed data as the pack step writes it."""
import json
from pathlib import Path

import numpy as np


def make_run_dir(root, vocab_size=256, train_tokens=40_000, val_tokens=4_000, seed=0):
    """run_dir/pack/{train,val}.bin + meta.json and a tokenizer.json. The token stream repeats 100
    random "sentences", so a tiny model's loss falls visibly within a few dozen steps."""
    run_dir = Path(root)
    (run_dir / "pack").mkdir(parents=True, exist_ok=True)
    (run_dir / "tokenizer").mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    sentences = [rng.integers(3, vocab_size, size=int(rng.integers(5, 20))) for _ in range(100)]

    def stream(n):
        out = []
        while len(out) < n:
            out.extend(sentences[int(rng.integers(len(sentences)))])
            out.append(1)   # eos
        return np.array(out[:n], dtype=np.uint16)

    stream(train_tokens).tofile(run_dir / "pack" / "train.bin")
    stream(val_tokens).tofile(run_dir / "pack" / "val.bin")
    (run_dir / "pack" / "meta.json").write_text(json.dumps(
        {"dtype": "uint16", "vocab_size": vocab_size, "eos_id": 1, "bos_id": 0,
         "train_tokens": train_tokens, "val_tokens": val_tokens}))
    (run_dir / "tokenizer" / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE"}}))
    return run_dir


def losses(metrics_path):
    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}
