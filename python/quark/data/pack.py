"""Packing (pipeline step `pack`): dedup/docs.jsonl + tokenizer/tokenizer.json -> run_dir/pack/.

Output contract (what quark.data.loader reads):
  train.bin, val.bin  flat token arrays (np.memmap(path, dtype)), each document's tokens followed by
                      the <|eos|> id, so documents are separated by <|eos|>
  meta.json           {"dtype": "uint16"|"uint32", "vocab_size", "train_tokens", "val_tokens",
                       "eos_id", "bos_id", "train_docs", "val_docs"}
  train.idx, val.idx  uint64 token offset of the start of every document (np.fromfile), the index
Documents go to val when a seeded hash of their id falls below val_fraction (stable under reruns
and independent of order; at least one document goes to val). uint16 is used when every id fits.

Tokenization is parallel (tokenizers' encode_batch runs on all cores in Rust) and streaming: a
batch of documents at a time is read, encoded and appended, so corpora larger than RAM work.
After each batch the four files are fsynced and their sizes committed to progress.json; a rerun
truncates them back to the committed sizes and continues from the next document.
"""
import hashlib
import json
import os
import time
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from quark.config import ConfigError, Step, from_dict
from quark.data.shards import file_state, fingerprint, open_at
from quark.io import atomic_write_json
from quark.rundir import RunDir

FILES = ("train.bin", "val.bin", "train.idx", "val.idx")


@dataclass
class PackConfig:
    val_fraction: float = 0.05
    batch_docs: int = 512
    seed: int = 0

    def __post_init__(self):
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"pack.val_fraction: must be in [0, 1), got {self.val_fraction}")
        if self.batch_docs < 1:
            raise ConfigError(f"pack.batch_docs: must be >= 1, got {self.batch_docs}")


def validate_config(cfg):
    from_dict(PackConfig, cfg, "pack")


def is_val(doc_id, seed, fraction):
    h = hashlib.blake2b(f"{seed}:{doc_id}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2.0 ** 64 < fraction


def _batches(path, size):
    batch = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                batch.append((str(rec.get("id", n)), rec["text"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{path}:{n}: not a JSON record with 'text'") from None
            if len(batch) == size:
                yield batch
                batch = []
    if batch:
        yield batch


def run_step(run_dir, cfg):
    c = from_dict(PackConfig, cfg, "pack")
    run_dir = RunDir.of(run_dir)
    src = run_dir.input("dedup", "docs.jsonl")
    tok_path = run_dir.tokenizer_path()
    chat = run_dir.chat()   # the run's tokenizer: the tokenizer step's, or a base model's with its own eos
    tok = chat.tokenizer
    eos, bos = chat.eos_id, chat.bos_id
    if eos is None:
        raise ValueError(f"tokenizer {tok_path} has no end-of-document token (<|eos|>, or an eos_token beside it)")
    vocab = tok.get_vocab_size()
    dtype = np.uint16 if vocab <= 1 << 16 else np.uint32
    out = run_dir.output("pack")
    progress_path = out / "progress.json"
    fp = fingerprint(vars(c), file_state([src, tok_path]))
    progress = json.loads(progress_path.read_text()) if progress_path.exists() else {}
    if progress.get("fingerprint") != fp:  # new inputs or settings: start over
        progress = {"fingerprint": fp, "docs": 0, "sizes": {f: 0 for f in FILES}, "tokens": {"train": 0, "val": 0},
                    "n_docs": {"train": 0, "val": 0}}
    files = {}
    for name in FILES:
        files[name] = open_at(out / name, progress["sizes"][name])  # drops what was appended after the last commit
    n_total = sum(1 for line in open(src, "rb") if line.strip())
    t0 = time.time()
    done = 0
    with tqdm(total=n_total, initial=progress["docs"], desc="pack", unit="doc", disable=None) as bar:
        for batch in _batches(src, c.batch_docs):
            if done + len(batch) <= progress["docs"]:
                done += len(batch)
                continue
            skip = progress["docs"] - done
            batch, done = batch[skip:], progress["docs"]
            encodings = tok.encode_batch([t for _, t in batch], add_special_tokens=False)
            parts = {"train": [], "val": []}
            for (doc_id, _), enc in zip(batch, encodings):
                last = done == n_total - 1
                split = "val" if is_val(doc_id, c.seed, c.val_fraction) or (
                    last and c.val_fraction > 0 and progress["n_docs"]["val"] == 0) else "train"
                ids = enc.ids + [eos]
                parts[split].append(ids)
                files[f"{split}.idx"].write(np.uint64(progress["tokens"][split]).tobytes())
                progress["tokens"][split] += len(ids)
                progress["n_docs"][split] += 1
                done += 1
            for split, docs in parts.items():
                if docs:
                    files[f"{split}.bin"].write(np.fromiter((t for d in docs for t in d), dtype=dtype).tobytes())
            for name, f in files.items():
                f.flush()
                os.fsync(f.fileno())
                progress["sizes"][name] = f.tell()
            progress["docs"] = done
            atomic_write_json(progress_path, progress)
            bar.update(len(batch))
    for f in files.values():
        f.close()
    meta = {"dtype": np.dtype(dtype).name, "vocab_size": vocab, "train_tokens": progress["tokens"]["train"],
            "val_tokens": progress["tokens"]["val"], "eos_id": eos, "bos_id": bos,
            "train_docs": progress["n_docs"]["train"], "val_docs": progress["n_docs"]["val"]}
    atomic_write_json(out / "meta.json", meta)
    stats = dict(meta, docs=progress["docs"], val_fraction=c.val_fraction, seconds=round(time.time() - t0, 2))
    atomic_write_json(out / "stats.json", stats)
    return stats


STEP = Step(name="pack", config=PackConfig, run=run_step, check=validate_config)
