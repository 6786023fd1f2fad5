"""Hybrid document store: SQLite (documents, chunks, FTS5 BM25) + a dense vector index.

Layout of a store directory:
    store.sqlite            docs, chunks (text, offsets, embedding), chunks_fts (FTS5), state
    dense-<gen>.index       quark.search.Index over the chunk embeddings, as of generation <gen>
    dense-<gen>.ids.npy     the chunk ids that index holds
    dense.json              {"generation": gen, ...}: the commit point of the dense files

SQLite is the source of truth: every mutation is one transaction that also bumps `generation`, and
chunk embeddings are stored in it. The dense index is derived data, written after the commit under
a new name and published by atomically replacing dense.json. A crash between the SQLite commit and
that publish leaves dense.json at an older generation; on open the store sees the mismatch and
repairs the index by diffing its saved ids against the chunk table (remove deleted chunks, add new
ones from their stored vectors), so both sides always agree. Chunk ids come from AUTOINCREMENT and
are never reused, which is what makes the id diff sound.

Search: BM25 through FTS5, dense k-NN through the index (a metadata filter becomes the set of allowed
chunk ids, which the index honours exactly, scanning them directly when they are few), and hybrid
reciprocal-rank fusion of the two (Cormack, Clarke & Buettcher 2009: score = sum 1 / (k + rank)).

Pipeline step `index`: builds run_dir/index/ from run_dir/dedup/docs.jsonl with embeddings from the
run's latest model, resuming by document hash (unchanged documents are not re-embedded).
"""
import json
import re
import sqlite3
import threading
import time
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from quark.config import ConfigError, Step, from_dict
from quark.io import atomic_open, atomic_write_json
from quark.retrieval.chunk import chunk_text
from quark.retrieval.embed import content_hash
from quark.rundir import RunDir
from quark.search import Index

SCHEMA = """
CREATE TABLE IF NOT EXISTS docs (
    id TEXT PRIMARY KEY, source TEXT, meta TEXT NOT NULL DEFAULT '{}', hash TEXT NOT NULL,
    n_chunks INTEGER NOT NULL, updated_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY AUTOINCREMENT, doc_id TEXT NOT NULL REFERENCES docs(id) ON DELETE CASCADE,
    ord INTEGER NOT NULL, text TEXT NOT NULL, start INTEGER NOT NULL, end INTEGER NOT NULL,
    n_tokens INTEGER NOT NULL, vec BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS chunks_doc ON chunks(doc_id);
CREATE VIRTUAL TABLE IF NOT EXISTS chunks_fts USING fts5(
    text, content='chunks', content_rowid='id', tokenize="unicode61 remove_diacritics 2 tokenchars '_'");
CREATE VIRTUAL TABLE IF NOT EXISTS chunks_vocab USING fts5vocab(chunks_fts, 'row');
CREATE TRIGGER IF NOT EXISTS chunks_ai AFTER INSERT ON chunks BEGIN
    INSERT INTO chunks_fts(rowid, text) VALUES (new.id, new.text); END;
CREATE TRIGGER IF NOT EXISTS chunks_ad AFTER DELETE ON chunks BEGIN
    INSERT INTO chunks_fts(chunks_fts, rowid, text) VALUES ('delete', old.id, old.text); END;
CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
_FILTER_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")
_FILTER_OPS = {"=": "=", "!=": "!=", "<": "<", "<=": "<=", ">": ">", ">=": ">="}
_TERM = re.compile(r"\w+", re.UNICODE)


@dataclass
class Hit:
    chunk_id: int
    doc_id: str
    text: str
    score: float                 # larger is better (RRF score, -bm25, or -distance)
    source: str = None
    meta: dict = field(default_factory=dict)
    start: int = 0
    end: int = 0
    ranks: dict = field(default_factory=dict)   # {"bm25": r, "dense": r} (1-based) where found


class Store:
    """Documents -> chunks -> (FTS5, dense index), kept in sync. Thread-safe (one lock)."""

    def __init__(self, path, embedder, tokenizer=None, chunk_tokens=128, chunk_overlap=32, max_chunks_per_doc=None,
                 index_kind="hnsw", autosave=True, max_df=0.02, min_df_cut=1000):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.embedder = embedder
        self.tokenizer = tokenizer
        self.chunk_tokens, self.chunk_overlap = chunk_tokens, chunk_overlap
        self.max_chunks_per_doc = max_chunks_per_doc   # long documents keep their first chunks only
        self.index_kind = index_kind
        self.autosave = autosave
        # BM25 ignores query terms found in more than max_df of all chunks and more than min_df_cut chunks.
        self.max_df, self.min_df_cut = max_df, min_df_cut
        self._df_cache, self._df_n = {}, 0
        self._allowed_cache = {}        # (filter, generation) -> allowed chunk ids
        self.lock = threading.RLock()
        self.db = sqlite3.connect(str(self.path / "store.sqlite"), check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")     # a commit is on disk before the index follows it
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.executescript(SCHEMA)
        self._check_state()
        self.dense = self._open_dense()
        self.dirty = False
        self.tombstones = 0             # rows removed from the index since it was last built or compacted

    # ----------------------------------------------------------------- state and dense persistence
    @staticmethod
    def saved_settings(path):
        """The settings a store directory was built with ({} when there is none), without opening it."""
        db_path = Path(path) / "store.sqlite"
        if not db_path.exists():
            return {}
        db = sqlite3.connect(str(db_path))
        try:
            return {k: json.loads(v) for k, v in db.execute("SELECT key, value FROM state")}
        except sqlite3.DatabaseError:
            return {}
        finally:
            db.close()

    def _get(self, key, default=None):
        row = self.db.execute("SELECT value FROM state WHERE key=?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def _set(self, key, value):
        self.db.execute("INSERT OR REPLACE INTO state VALUES (?, ?)", (key, json.dumps(value)))

    @property
    def generation(self):
        return self._get("generation", 0)

    def _check_state(self):
        want = {"embedder": self.embedder.name, "dim": int(self.embedder.dim),
                "chunking": [self.chunk_tokens, self.chunk_overlap, self.max_chunks_per_doc]}
        have = {k: self._get(k) for k in want}
        if all(v is None for v in have.values()):
            with self.db:
                self.db.execute("BEGIN IMMEDIATE")
                for k, v in want.items():
                    self._set(k, v)
            return
        for k, v in want.items():
            if have[k] != v:
                raise ValueError(f"store {self.path} was built with {k}={have[k]!r}, not {v!r}: "
                                 f"open it with the same settings or build a new store")

    def _open_dense(self):
        """Load the published index; repair it from SQLite when it lags behind the last commit."""
        gen = self.generation
        pointer = self.path / "dense.json"
        dense, ids = None, np.zeros(0, np.int64)
        if pointer.exists():
            saved = json.loads(pointer.read_text())
            try:
                dense = Index.load(str(self.path / saved["index"]))
                ids = np.load(self.path / saved["ids"])
            except (OSError, ValueError, KeyError):
                dense = None            # unreadable: rebuilt from SQLite below
            if dense is not None and saved["generation"] == gen:
                return dense
        if dense is None:
            dense, ids = Index(int(self.embedder.dim), metric="ip", kind=self.index_kind), np.zeros(0, np.int64)
        have = set(ids.tolist())
        want = {r[0] for r in self.db.execute("SELECT id FROM chunks")}
        stale = sorted(have - want)
        if stale:
            dense.remove(np.asarray(stale, np.int64))
        missing = sorted(want - have)
        for b in range(0, len(missing), 10_000):
            part = missing[b:b + 10_000]
            dense.add(self._vectors(part), np.asarray(part, np.int64))
        self._publish(dense, gen)
        return dense

    def _vectors(self, chunk_ids):
        """Stored embeddings of chunk_ids, in that order -> (n, dim) float32."""
        out = np.zeros((len(chunk_ids), self.embedder.dim), np.float32)
        pos = {c: i for i, c in enumerate(chunk_ids)}
        for b in range(0, len(chunk_ids), 500):
            part = chunk_ids[b:b + 500]
            for cid, vec in self.db.execute(f"SELECT id, vec FROM chunks WHERE id IN ({','.join('?' * len(part))})", part):
                out[pos[cid]] = np.frombuffer(vec, np.float32)
        return out

    def _publish(self, dense, gen):
        """Write the index under a generation-specific name, then switch dense.json to it."""
        ids = np.asarray(sorted(r[0] for r in self.db.execute("SELECT id FROM chunks")), np.int64)
        name = f"dense-{gen}-{time.time_ns()}"
        dense.save(str(self.path / f"{name}.index"))    # atomic and fsynced by quark.search
        with atomic_open(self.path / f"{name}.ids.npy") as f:
            np.save(f, ids)
        self._commit_pointer({"generation": gen, "index": f"{name}.index", "ids": f"{name}.ids.npy", "n": len(ids)})
        for old in self.path.glob("dense-*"):      # earlier generations are unreachable now
            if not old.name.startswith(name):
                _remove(old)

    def _commit_pointer(self, record):
        atomic_write_json(self.path / "dense.json", record)

    def flush(self):
        """Persist the dense index now (after mutations made with autosave=False)."""
        with self.lock:
            if self.dirty:
                self._publish(self.dense, self.generation)
                self.dirty = False

    def close(self):
        with self.lock:
            self.flush()
            self.db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------------------ mutations
    def upsert(self, docs):
        """Add or replace documents [{id, text, source?, meta?}]; unchanged ones are skipped, a change
        of metadata alone is applied without re-embedding. -> {"added", "updated", "unchanged", "chunks"}."""
        docs = [_check_doc(d, i) for i, d in enumerate(docs)]
        stats = {"added": 0, "updated": 0, "unchanged": 0, "chunks": 0}
        with self.lock:
            known = self._known({d["id"] for d in docs})
            changed, meta_only = [], []
            for d in docs:
                h = content_hash(d["text"])
                old = known.get(d["id"])
                if old and old[0] == h:
                    if old[1] != d["source"] or json.loads(old[2]) != d["meta"]:
                        meta_only.append(d)
                    else:
                        stats["unchanged"] += 1
                    continue
                stats["updated" if old else "added"] += 1
                chunks = chunk_text(d["text"], self.tokenizer, self.chunk_tokens, self.chunk_overlap)
                changed.append((d, h, chunks[: self.max_chunks_per_doc]))
            texts = [c.text for _, _, chunks in changed for c in chunks]
            vecs = self.embedder.embed(texts) if texts else np.zeros((0, self.embedder.dim), np.float32)
            if not changed and not meta_only:
                return stats
            removed, added, v = [], [], 0
            now = time.time()
            with self.db:
                self.db.execute("BEGIN IMMEDIATE")
                for d in meta_only:
                    self.db.execute("UPDATE docs SET source=?, meta=?, updated_at=? WHERE id=?",
                                    (d["source"], json.dumps(d["meta"]), now, d["id"]))
                for d, h, chunks in changed:
                    removed += [r[0] for r in self.db.execute("SELECT id FROM chunks WHERE doc_id=?", (d["id"],))]
                    self.db.execute("DELETE FROM chunks WHERE doc_id=?", (d["id"],))
                    self.db.execute("INSERT OR REPLACE INTO docs VALUES (?, ?, ?, ?, ?, ?)",
                                    (d["id"], d["source"], json.dumps(d["meta"]), h, len(chunks), now))
                    for o, c in enumerate(chunks):
                        cur = self.db.execute("INSERT INTO chunks (doc_id, ord, text, start, end, n_tokens, vec) "
                                              "VALUES (?, ?, ?, ?, ?, ?, ?)",
                                              (d["id"], o, c.text, c.start, c.end, c.n_tokens, vecs[v].tobytes()))
                        added.append(cur.lastrowid)
                        v += 1
                self._set("generation", self.generation + 1)
            stats["chunks"] = len(added)
            self._apply_dense(removed, added, vecs)
        return stats

    def delete(self, doc_ids):
        """Remove documents (and their chunks) by id -> number of documents removed."""
        doc_ids = list(doc_ids)
        with self.lock:
            with self.db:
                self.db.execute("BEGIN IMMEDIATE")
                removed = []
                for b in range(0, len(doc_ids), 500):
                    part = doc_ids[b:b + 500]
                    marks = ",".join("?" * len(part))
                    removed += [r[0] for r in self.db.execute(f"SELECT id FROM chunks WHERE doc_id IN ({marks})", part)]
                n = 0
                for b in range(0, len(doc_ids), 500):
                    part = doc_ids[b:b + 500]
                    n += self.db.execute(f"DELETE FROM docs WHERE id IN ({','.join('?' * len(part))})", part).rowcount
                if n:
                    self._set("generation", self.generation + 1)
            if n:
                self._apply_dense(removed, [], np.zeros((0, self.embedder.dim), np.float32))
        return n

    def _apply_dense(self, removed, added, vecs):
        if removed:
            self.dense.remove(np.asarray(removed, np.int64))
            # Removed rows stay in the HNSW graph as tombstones; rebuild once they are a quarter of it.
            self.tombstones += len(removed)
            if self.tombstones > 0.25 * max(len(self.dense), 1):
                self.dense.compact()
                self.tombstones = 0
        if added:
            self.dense.add(np.ascontiguousarray(vecs, np.float32), np.asarray(added, np.int64))
        self.dirty = True
        if self.autosave:
            self.flush()

    def _known(self, ids):
        ids, out = list(ids), {}
        for b in range(0, len(ids), 500):
            part = ids[b:b + 500]
            q = f"SELECT id, hash, source, meta FROM docs WHERE id IN ({','.join('?' * len(part))})"
            out.update((r[0], r[1:]) for r in self.db.execute(q, part))
        return out

    # ------------------------------------------------------------------------------ reading
    def __len__(self):
        return self.db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]

    def num_docs(self):
        return self.db.execute("SELECT COUNT(*) FROM docs").fetchone()[0]

    def doc_hashes(self):
        return dict(self.db.execute("SELECT id, hash FROM docs"))

    def get_document(self, doc_id):
        row = self.db.execute("SELECT id, source, meta, hash, n_chunks FROM docs WHERE id=?", (doc_id,)).fetchone()
        if row is None:
            return None
        chunks = [r[0] for r in self.db.execute("SELECT text FROM chunks WHERE doc_id=? ORDER BY ord", (doc_id,))]
        return {"id": row[0], "source": row[1], "meta": json.loads(row[2]), "hash": row[3], "chunks": chunks}

    def chunks(self, limit=None):
        """Iterate (chunk_id, doc_id, text) in id order."""
        q = "SELECT id, doc_id, text FROM chunks ORDER BY id" + (f" LIMIT {int(limit)}" if limit else "")
        yield from self.db.execute(q)

    def check(self):
        """Consistency report: SQLite chunks vs FTS rows vs dense index size."""
        n = len(self)
        fts = self.db.execute("SELECT COUNT(*) FROM chunks_fts").fetchone()[0]
        return {"chunks": n, "fts": fts, "dense": len(self.dense), "consistent": n == fts == len(self.dense)}

    # ------------------------------------------------------------------------------ search
    def _filter_sql(self, filt):
        """{"source": "x", "lang": ["c", "py"], "year": {">=": 2020}} -> (SQL over docs d, params)."""
        if not filt:
            return "", []
        if not isinstance(filt, dict):
            raise ValueError(f"filter must be a mapping of field to condition, got {type(filt).__name__}")
        clauses, params = [], []
        for key, cond in filt.items():
            if not isinstance(key, str) or not _FILTER_KEY.match(key):
                raise ValueError(f"filter field {key!r} is not a valid name (letters, digits, _ and .)")
            col, head = {"doc_id": ("d.id", []), "source": ("d.source", [])}.get(
                key, ("json_extract(d.meta, ?)", [f"$.{key}"]))   # other keys are meta fields
            conds = cond if isinstance(cond, dict) else {"in": cond} if isinstance(cond, list) else {"=": cond}
            for op, value in conds.items():
                if op == "in":
                    if not isinstance(value, list) or not value:
                        raise ValueError(f"filter {key!r}: 'in' needs a non-empty list")
                    clauses.append(f"{col} IN ({','.join('?' * len(value))})")
                    params += head + list(value)
                elif op in _FILTER_OPS:
                    clauses.append(f"{col} {_FILTER_OPS[op]} ?")
                    params += head + [value]
                else:
                    raise ValueError(f"filter {key!r}: unknown operator {op!r}; use one of "
                                     f"{', '.join(['in', *_FILTER_OPS])}")
        return " AND " + " AND ".join(clauses), params

    def _doc_freq(self, terms):
        """Chunks containing each term (fts5vocab counts by scanning the term's postings, so counts are
        cached; the cache is dropped when the store has grown or shrunk by more than 10%)."""
        n = len(self)
        if abs(n - self._df_n) > 0.1 * max(self._df_n, 1):
            self._df_cache, self._df_n = {}, n
        for t in terms:
            if t not in self._df_cache:
                row = self.db.execute("SELECT doc FROM chunks_vocab WHERE term=?", (t,)).fetchone()
                self._df_cache[t] = row[0] if row else 0
        return [self._df_cache[t] for t in terms], n

    def search_bm25(self, query, k=10, filter=None):
        """-> [(chunk_id, bm25 score)] best first (FTS5 bm25: smaller is better, returned negated).

        Query terms are OR-ed. Terms in more than max_df of all chunks (and more than min_df_cut) are
        dropped first: their IDF is near zero, yet FTS5 would score every chunk that holds them, at
        about 2.5 us a chunk (a term in all of 100k chunks: 0.25 s per query)."""
        terms = list(dict.fromkeys(_fold(t) for t in _TERM.findall(query)))
        if not terms:
            return []
        with self.lock:
            dfs, n = self._doc_freq(terms)
            terms = [t for t, df in zip(terms, dfs) if df <= max(self.max_df * n, self.min_df_cut)]
            if not terms:
                return []
            match = " OR ".join(f'"{t}"' for t in terms)   # quoted: no FTS5 syntax from users
            where, params = self._filter_sql(filter)
            sql = ("SELECT c.id, bm25(chunks_fts) AS s FROM chunks_fts JOIN chunks c ON c.id = chunks_fts.rowid "
                   f"JOIN docs d ON d.id = c.doc_id WHERE chunks_fts MATCH ?{where} ORDER BY s LIMIT ?")
            return [(cid, -s) for cid, s in self.db.execute(sql, [match, *params, int(k)])]

    def search_dense(self, query_vec, k=10, filter=None):
        """-> [(chunk_id, -distance)] best first; query_vec (dim,) float32 (normalised)."""
        q = np.ascontiguousarray(np.asarray(query_vec, np.float32).reshape(1, -1))
        with self.lock:
            n = len(self.dense)
            if n == 0 or k <= 0:
                return []
            allowed = self._allowed_ids(filter) if filter else None
            if allowed is not None and len(allowed) == 0:
                return []
            dist, ids = self.dense.search(q, min(k, n), filter=allowed)
            return [(int(i), -float(d)) for d, i in zip(dist[0], ids[0]) if i >= 0]

    def search(self, query, k=10, mode="hybrid", filter=None, candidates=50, rrf_k=60, query_vec=None):
        """Top-k chunks for a text query -> [Hit]. mode: "hybrid" (RRF of BM25 and dense), "bm25", "dense".
        query_vec: the query's embedding when the caller has it already (batched evaluation)."""
        if mode not in ("hybrid", "bm25", "dense"):
            raise ValueError(f"mode must be 'hybrid', 'bm25' or 'dense', got {mode!r}")
        n_cand = max(k, candidates)
        ranked = {}
        if mode in ("hybrid", "bm25"):
            ranked["bm25"] = self.search_bm25(query, n_cand if mode == "hybrid" else k, filter)
        if mode in ("hybrid", "dense"):
            qv = self.embedder.embed([query])[0] if query_vec is None else np.asarray(query_vec, np.float32)
            ranked["dense"] = self.search_dense(qv, n_cand if mode == "hybrid" else k, filter) if qv.any() else []
        if mode != "hybrid":
            scored = {cid: s for cid, s in ranked[mode]}
        else:
            scored = {}
            for results in ranked.values():
                for r, (cid, _) in enumerate(results, 1):
                    scored[cid] = scored.get(cid, 0.0) + 1.0 / (rrf_k + r)
        top = sorted(scored.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
        ranks = {name: {cid: r for r, (cid, _) in enumerate(res, 1)} for name, res in ranked.items()}
        return self._hits(top, ranks)

    def _allowed_ids(self, filter):
        """Chunk ids passing a metadata filter, for the index (which scans them exactly when few).
        The SQL scan costs ~1 ms per 1k chunks, and filters repeat (a tenant, a source), so the
        last 32 answers are cached for the current generation."""
        key = (json.dumps(filter, sort_keys=True, default=str), self.generation)
        ids = self._allowed_cache.get(key)
        if ids is None:
            where, params = self._filter_sql(filter)
            ids = np.fromiter((r[0] for r in self.db.execute(
                f"SELECT c.id FROM chunks c JOIN docs d ON d.id = c.doc_id WHERE 1=1{where}", params)), np.int64)
            if len(self._allowed_cache) >= 32:
                self._allowed_cache.pop(next(iter(self._allowed_cache)))
            self._allowed_cache[key] = ids
        return ids

    def _hits(self, top, ranks):
        if not top:
            return []
        ids = [cid for cid, _ in top]
        with self.lock:
            rows = {r[0]: r for r in self.db.execute(
                "SELECT c.id, c.doc_id, c.text, c.start, c.end, d.source, d.meta FROM chunks c JOIN docs d "
                f"ON d.id = c.doc_id WHERE c.id IN ({','.join('?' * len(ids))})", ids)}
        return [Hit(cid, rows[cid][1], rows[cid][2], score, rows[cid][5], json.loads(rows[cid][6]),
                    rows[cid][3], rows[cid][4], {n: r[cid] for n, r in ranks.items() if cid in r})
                for cid, score in top if cid in rows]


def _fold(term):
    """A query term as FTS5's unicode61 tokenizer indexes it: lower case, diacritics removed."""
    return "".join(c for c in unicodedata.normalize("NFKD", term.lower()) if not unicodedata.combining(c))


def _check_doc(d, i):
    if not isinstance(d, dict):
        raise ValueError(f"document {i}: expected a mapping with 'id' and 'text', got {type(d).__name__}")
    if not isinstance(d.get("id"), str) or not d["id"]:
        raise ValueError(f"document {i}: 'id' must be a non-empty string")
    if not isinstance(d.get("text"), str):
        raise ValueError(f"document {d['id']!r}: 'text' must be a string")
    meta = d.get("meta") or {}
    if not isinstance(meta, dict):
        raise ValueError(f"document {d['id']!r}: 'meta' must be a mapping")
    return {"id": d["id"], "text": d["text"], "source": d.get("source"), "meta": meta}


def _remove(path):
    Path(path).unlink(missing_ok=True)


# ------------------------------------------------------------------------- pipeline step `index`
@dataclass
class IndexConfig:
    max_docs: int = 400              # documents indexed (a seeded sample of dedup/docs.jsonl); 0 = all
    max_chunks_per_doc: int = 8      # long documents keep their first chunks
    chunk_tokens: int = 128
    chunk_overlap: int = 32
    embedder: str = "model"          # "model": mean hidden states of `model`; "minilm": all-MiniLM-L6-v2 if installed;
                                     # an http(s) URL: an OpenAI-compatible server's /v1 (e.g. `quark serve`)
    model: str = "latest"            # the embedding model: "latest", a model step, or a model directory (Quark or
                                     # Hugging Face; it embeds with its own tokenizer)
    index_kind: str = "hnsw"         # quark.search.Index kind: "hnsw" or "flat"
    batch_docs: int = 64             # documents per SQLite transaction
    seed: int = 0


def validate_config(cfg):
    c = from_dict(IndexConfig, cfg, "index")
    if c.embedder not in ("model", "minilm") and not c.embedder.startswith(("http://", "https://")):
        raise ConfigError(f"index.embedder: must be 'model', 'minilm' or an http(s) URL, got {c.embedder!r}")
    if c.index_kind not in ("hnsw", "flat"):
        raise ConfigError(f"index.index_kind: must be 'hnsw' or 'flat', got {c.index_kind!r}")
    if c.chunk_tokens < 8 or not 0 <= c.chunk_overlap < c.chunk_tokens:
        raise ConfigError(f"index.chunk_overlap: need chunk_tokens >= 8 and 0 <= chunk_overlap < chunk_tokens, "
                          f"got {c.chunk_tokens} / {c.chunk_overlap}")
    if c.max_docs < 0 or c.max_chunks_per_doc < 1 or c.batch_docs < 1:
        raise ConfigError("index.max_docs must be >= 0, max_chunks_per_doc and batch_docs >= 1")
    return c


def run_embedder(run_dir, kind="model", model="latest"):
    """The embedder a run's retrieval uses: a model of the run (RunDir.model(model), with its own
    tokenizer), MiniLM, or an OpenAI-compatible embeddings server at a URL."""
    if kind.startswith(("http://", "https://")):
        from quark.retrieval.embed import OpenAIEmbedder
        return OpenAIEmbedder(kind)
    if kind == "minilm":
        from quark.retrieval.embed import SentenceTransformerEmbedder
        return SentenceTransformerEmbedder()
    from quark.retrieval.embed import QuarkEmbedder
    run_dir = RunDir.of(run_dir)
    model_dir = run_dir.model(model)
    return QuarkEmbedder.from_dir(model_dir, run_dir.tokenizer_path(model_dir))


def open_run_store(run_dir, autosave=True):
    """The store of run_dir/index/, opened with the settings the index step built it with."""
    run_dir = RunDir.of(run_dir)
    path = run_dir.input("index", "config.json")
    c = from_dict(IndexConfig, json.loads(path.read_text()), str(path))
    for name in ("store.sqlite", "dense.json"):   # what the index step wrote: a rerun of it changes these
        if run_dir.has("index", name):
            run_dir.input("index", name)
    return Store(run_dir.root / "index", run_embedder(run_dir, c.embedder, c.model), run_dir.tokenizer(),
                 c.chunk_tokens, c.chunk_overlap, c.max_chunks_per_doc, c.index_kind, autosave=autosave)


def _select_docs(path, max_docs, seed):
    import hashlib

    from quark.io import read_jsonl
    docs = []
    for n, rec in read_jsonl(path):
        if not isinstance(rec, dict) or not isinstance(rec.get("id"), str) or not isinstance(rec.get("text"), str):
            raise ValueError(f"{path}:{n}: expected a record with string 'id' and 'text'")
        if rec["text"].strip():
            docs.append({"id": rec["id"], "text": rec["text"], "source": rec.get("source"),
                         "meta": rec.get("meta") if isinstance(rec.get("meta"), dict) else {}})
    if max_docs and len(docs) > max_docs:   # a seeded sample that is stable as the corpus grows
        key = lambda d: hashlib.sha256(f"{seed}:{d['id']}".encode()).digest()
        docs = sorted(docs, key=key)[:max_docs]
    return docs


def run_step(run_dir, cfg):
    from tqdm import tqdm

    from quark.retrieval.embed import CachedEmbedder
    c = validate_config(cfg)
    run_dir = RunDir.of(run_dir)
    src = run_dir.input("dedup", "docs.jsonl")
    out = run_dir.output("index")
    t0 = time.time()
    embedder = CachedEmbedder(run_embedder(run_dir, c.embedder, c.model), out / "embed_cache.sqlite")
    built = Store.saved_settings(out)
    want_chunking = [c.chunk_tokens, c.chunk_overlap, c.max_chunks_per_doc]
    if built and (built.get("embedder") != embedder.name or built.get("chunking") != want_chunking):
        for p in [out / "store.sqlite", out / "store.sqlite-wal", out / "store.sqlite-shm", out / "dense.json",
                  *out.glob("dense-*")]:
            _remove(p)   # another model or chunking: start over (the embedding cache stays valid)
    docs = _select_docs(src, c.max_docs, c.seed)
    store = Store(out, embedder, run_dir.tokenizer(), c.chunk_tokens, c.chunk_overlap, c.max_chunks_per_doc,
                  c.index_kind, autosave=False)
    totals = {"added": 0, "updated": 0, "unchanged": 0, "chunks": 0}
    keep = {d["id"] for d in docs}
    removed = store.delete([i for i in store.doc_hashes() if i not in keep])
    with tqdm(total=len(docs), desc="index", unit="doc") as bar:
        for b in range(0, len(docs), c.batch_docs):
            part = docs[b:b + c.batch_docs]
            for k, v in store.upsert(part).items():
                totals[k] += v
            bar.update(len(part))
    store.flush()
    atomic_write_json(out / "config.json", asdict(c))
    stats = {**totals, "removed": removed, "docs": store.num_docs(), "chunks_total": len(store),
             "embedder": embedder.name, "dim": int(embedder.dim), "cache_hits": embedder.hits,
             "embedded": embedder.misses, "consistent": store.check()["consistent"],
             "seconds": round(time.time() - t0, 2)}
    store.close()
    embedder.close()
    return stats


STEP = Step(name="index", config=IndexConfig, run=run_step, check=validate_config)


# ------------------------------------------------------------------------------ tool `quark search`
def configure_parser(parser):
    parser.add_argument("query", help="what to search for")
    parser.add_argument("--run-dir", default="runs/default", help="run directory with index/ (default: runs/default)")
    parser.add_argument("-k", type=int, default=5, help="results to show")
    parser.add_argument("--mode", choices=("hybrid", "bm25", "dense"), default="hybrid")
    parser.add_argument("--filter", default=None, help='metadata filter as JSON, e.g. \'{"source": "pydoc"}\'')


def run_cli(args):
    try:
        filt = json.loads(args.filter) if args.filter else None
        store = open_run_store(args.run_dir)
        hits = store.search(args.query, k=args.k, mode=args.mode, filter=filt)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}")
        return 2
    for n, h in enumerate(hits, 1):
        text = " ".join(h.text.split())
        print(f"[{n}] {h.score:.4f} {h.doc_id} ({h.source}) ranks={h.ranks}\n    {text[:200]}")
    store.close()
    return 0
