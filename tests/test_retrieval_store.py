import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from tests.retrieval_helpers import CORPUS, tiny_model, tiny_tokenizer

from quark.retrieval.embed import QuarkEmbedder
from quark.retrieval.store import Store

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def embedder(tok):
    return QuarkEmbedder(tiny_model(tok.get_vocab_size()), tok, name="tiny")


def docs():
    return [{"id": k, "text": v, "source": "notes" if i % 2 else "web", "meta": {"topic": k, "year": 2000 + i}}
            for i, (k, v) in enumerate(CORPUS.items())]


def open_store(path, embedder, tok, **kw):
    return Store(path, embedder, tok, chunk_tokens=24, chunk_overlap=6, **kw)


def test_add_search_and_hybrid_fusion(tmp_path, embedder, tok):
    with open_store(tmp_path / "s", embedder, tok) as st:
        stats = st.upsert(docs())
        assert stats["added"] == len(CORPUS) and stats["chunks"] == len(st) > len(CORPUS)
        assert st.check()["consistent"]
        top = st.search("full-text search BM25 in the embedded database", k=3, mode="bm25")
        assert top[0].doc_id == "sqlite" and top[0].text in CORPUS["sqlite"]
        assert CORPUS["sqlite"][top[0].start:top[0].end] == top[0].text
        # The dense side returns the chunk itself for a query equal to the chunk's text.
        cid, _, text = next(st.chunks())
        assert st.search_dense(embedder.embed([text])[0], k=1)[0][0] == cid
        # Hybrid = reciprocal-rank fusion of the two lists.
        q = "bake the bread dough in a hot oven"
        bm, dn = st.search_bm25(q, 50), st.search_dense(embedder.embed([q])[0], 50)
        expect = {}
        for lst in (bm, dn):
            for r, (c, _) in enumerate(lst, 1):
                expect[c] = expect.get(c, 0) + 1 / (60 + r)
        hits = st.search(q, k=5)
        assert [h.chunk_id for h in hits] == [c for c, _ in sorted(expect.items(), key=lambda kv: (-kv[1], kv[0]))[:5]]
        assert hits[0].doc_id == "cooking" and "bm25" in hits[0].ranks
        assert np.isclose(hits[0].score, expect[hits[0].chunk_id])
        assert st.search("?!", k=3, mode="bm25") == []          # no terms, no FTS5 syntax error
        assert st.search('"NEAR(bread) OR', k=1, mode="bm25")[0].doc_id == "cooking"


def test_update_delete_keep_fts_and_dense_in_sync(tmp_path, embedder, tok):
    with open_store(tmp_path / "s", embedder, tok) as st:
        st.upsert(docs())
        n0 = len(st)
        assert st.upsert(docs()) == {"added": 0, "updated": 0, "unchanged": len(CORPUS), "chunks": 0}
        gen = st.generation
        new = {"id": "weather", "text": "Snow and ice are expected with a frost warning.", "meta": {"topic": "weather"}}
        assert st.upsert([new])["updated"] == 1 and st.generation == gen + 1
        assert st.search("rain sunshine afternoon", k=10, mode="bm25", filter={"doc_id": "weather"}) == []
        assert st.search("frost warning", k=1, mode="bm25")[0].doc_id == "weather"
        c = st.check()
        assert c["consistent"] and c["chunks"] < n0
        meta_only = dict(new, meta={"topic": "winter"})
        assert st.upsert([meta_only])["chunks"] == 0
        assert st.get_document("weather")["meta"] == {"topic": "winter"}
        assert st.delete(["weather", "cooking", "nope"]) == 2
        assert st.get_document("cooking") is None and st.check()["consistent"]
        assert all(h.doc_id not in ("weather", "cooking") for h in st.search("bread frost", k=20))


@pytest.mark.parametrize("kind", ["hnsw", "flat"])
def test_metadata_filters(tmp_path, embedder, tok, kind):
    with open_store(tmp_path / "s", embedder, tok, index_kind=kind) as st:
        st.upsert(docs())
        for mode in ("bm25", "dense", "hybrid"):
            hits = st.search("database graph tokens bread", k=50, mode=mode, filter={"source": "web"})
            assert hits and {h.source for h in hits} == {"web"}
            hits = st.search("database graph tokens bread", k=50, mode=mode, filter={"topic": ["hnsw", "python"]})
            assert {h.doc_id for h in hits} <= {"hnsw", "python"} and hits
            hits = st.search("database graph tokens bread", k=50, mode=mode, filter={"year": {">=": 2004}})
            assert {h.doc_id for h in hits} <= {"weather", "cooking"} and hits
        assert st.search("bread", k=5, filter={"topic": "absent"}) == []
        with pytest.raises(ValueError, match="not a valid name"):
            st.search("x", filter={"a'); DROP TABLE docs; --": 1})
        with pytest.raises(ValueError, match="unknown operator"):
            st.search("x", filter={"year": {"~": 1}})


def test_persistence_and_settings_check(tmp_path, embedder, tok):
    with open_store(tmp_path / "s", embedder, tok) as st:
        st.upsert(docs())
        before = [(h.chunk_id, h.score) for h in st.search("nearest neighbour graph", k=5)]
    with open_store(tmp_path / "s", embedder, tok) as st:
        assert [(h.chunk_id, h.score) for h in st.search("nearest neighbour graph", k=5)] == before
        assert len(list((tmp_path / "s").glob("dense-*.index"))) == 1   # older generations removed
    other = QuarkEmbedder(tiny_model(tok.get_vocab_size(), seed=3), tok, name="other")
    with pytest.raises(ValueError, match="embedder"):
        Store(tmp_path / "s", other, tok, chunk_tokens=24, chunk_overlap=6)
    with pytest.raises(ValueError, match="'text' must be a string"):
        with open_store(tmp_path / "s", embedder, tok) as st:
            st.upsert([{"id": "x", "text": None}])


def test_corrupt_dense_index_is_rebuilt_from_sqlite(tmp_path, embedder, tok):
    with open_store(tmp_path / "s", embedder, tok) as st:
        st.upsert(docs())
        before = [h.chunk_id for h in st.search("nearest neighbour graph", k=5, mode="dense")]
    pointer = json.loads((tmp_path / "s" / "dense.json").read_text())
    (tmp_path / "s" / pointer["index"]).write_bytes(b"garbage")
    with open_store(tmp_path / "s", embedder, tok) as st:
        assert st.check()["consistent"]
        assert [h.chunk_id for h in st.search("nearest neighbour graph", k=5, mode="dense")] == before


CHILD = """
import sys, os, signal, time
sys.path.insert(0, {tests!r})
from tests.retrieval_helpers import tiny_model, tiny_tokenizer
from quark.retrieval.embed import QuarkEmbedder
from quark.retrieval.store import Store
tok = tiny_tokenizer()
st = Store({path!r}, QuarkEmbedder(tiny_model(tok.get_vocab_size()), tok, name="tiny"), tok,
           chunk_tokens=24, chunk_overlap=6, autosave=False)
st.delete(["hnsw"])
st.upsert([{{"id": "new", "text": "Quasars are distant luminous galactic nuclei powered by black holes."}},
           {{"id": "python", "text": "Python tuples are immutable sequences."}}])
if {inject}:   # die exactly between writing the new index files and publishing them
    Store._commit_pointer = lambda self, record: os.kill(os.getpid(), signal.SIGKILL)
    st.flush()
print("committed", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("inject", [False, True], ids=["killed-before-index-save", "killed-inside-index-save"])
def test_crash_between_sqlite_commit_and_index_write(tmp_path, embedder, tok, inject):
    path = tmp_path / "s"
    with open_store(path, embedder, tok) as st:
        st.upsert(docs())
        old_python = {h.chunk_id for h in st.search("dynamic arrays", k=50, filter={"doc_id": "python"})}
    code = textwrap.dedent(CHILD.format(tests=str(HERE), path=str(path), inject=inject))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    if inject:
        assert proc.wait(timeout=60) == -signal.SIGKILL
    else:
        assert proc.stdout.readline().strip() == "committed"   # SQLite has committed; the index was never saved
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    proc.stdout.close()
    stale = json.loads((path / "dense.json").read_text())
    with open_store(path, embedder, tok) as st:
        assert stale["generation"] < st.generation         # the crash left the dense side behind ...
        assert len(list(path.glob("dense-*.index"))) == 1  # the unpublished files were swept
        assert st.check()["consistent"]                    # ... and opening repaired it
        assert st.get_document("hnsw") is None
        dense_ids = {c for c, _ in st.search_dense(embedder.embed(["x"])[0], k=10_000)}
        sql_ids = {c for c, _, _ in st.chunks()}
        assert dense_ids == sql_ids and not dense_ids & old_python
        q = "Quasars are distant luminous galactic nuclei powered by black holes."
        assert st.search(q, k=1, mode="dense")[0].doc_id == "new"
        assert json.loads((path / "dense.json").read_text())["generation"] == st.generation


def test_bm25_drops_terms_in_most_chunks(tmp_path, embedder, tok):
    with open_store(tmp_path / "s", embedder, tok, max_df=0.2, min_df_cut=2) as st:
        st.upsert(docs())
        n_the = st.db.execute("SELECT doc FROM chunks_vocab WHERE term='the'").fetchone()[0]
        assert n_the > 0.2 * len(st)
        assert st.search_bm25("the", 10) == []                       # only a near-zero-IDF term: no lexical signal
        hits = st.search_bm25("the yeast", 10)
        assert hits and {st._hits([(c, 0)], {})[0].doc_id for c, _ in hits} == {"cooking"}   # "the" ignored
        assert st.search_bm25("Crème brûlée YEAST", 10)[0][0] == hits[0][0]   # folded like the FTS5 tokenizer
