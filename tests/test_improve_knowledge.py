import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from tests.retrieval_helpers import CORPUS, tiny_model, tiny_tokenizer

from quark.improve.knowledge import KnowledgeRefresher, html_to_text
from quark.retrieval.embed import CachedEmbedder, QuarkEmbedder
from quark.retrieval.store import Store

PAGES = {}          # path -> (etag or None, body, content type); edited by the tests
HITS = {"full": 0, "not_modified": 0}


class Site(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def do_GET(self):
        if self.path not in PAGES:
            self.send_response(404)
            self.end_headers()
            return
        etag, body, ctype = PAGES[self.path]
        if ctype == "redirect":
            self.send_response(302)
            self.send_header("Location", body)
            self.end_headers()
            return
        if etag and self.headers.get("If-None-Match") == etag:
            HITS["not_modified"] += 1
            self.send_response(304)
            self.end_headers()
            return
        HITS["full"] += 1
        data = body.encode()
        self.send_response(200)
        self.send_header("Content-Type", f"{ctype}; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        if etag:
            self.send_header("ETag", etag)
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture()
def site():
    PAGES.clear()
    PAGES["/sqlite"] = ('"v1"', f"<html><title>SQLite</title><script>x=1</script><p>{CORPUS['sqlite']}</p></html>", "text/html")
    PAGES["/hnsw"] = ('"v1"', CORPUS["hnsw"], "text/plain")
    PAGES["/python"] = (None, CORPUS["python"], "text/plain")      # no validators: hash only
    HITS.update(full=0, not_modified=0)
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Site)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


@pytest.fixture()
def store(tmp_path):
    tok = tiny_tokenizer()
    emb = CachedEmbedder(QuarkEmbedder(tiny_model(tok.get_vocab_size()), tok, name="tiny"), tmp_path / "cache.sqlite")
    st = Store(tmp_path / "s", emb, tok, chunk_tokens=24, chunk_overlap=6)
    yield st
    st.close()


def chunk_ids(store, doc_id):
    return [r[0] for r in store.db.execute("SELECT id FROM chunks WHERE doc_id=? ORDER BY ord", (doc_id,))]


def test_html_to_text():
    text, title = html_to_text("<html><head><title> T </title><style>p{}</style></head><body><p>a &amp; b</p>"
                               "<div>c   d</div><script>evil()</script></body></html>")
    assert (text, title) == ("a & b\nc d", "T")


def test_refresh_by_etag_updates_only_changed_pages(site, store):
    kr = KnowledgeRefresher(store, allow_hosts=[site.split("//")[1]])
    for p in PAGES:
        kr.add_url(site + p, doc_id=p.strip("/"), meta={"origin": "site"})
    first = kr.refresh()
    assert first["n_added"] == 3 and HITS["full"] == 3
    assert store.get_document("sqlite")["meta"] == {"origin": "site", "title": "SQLite"}
    assert "x=1" not in " ".join(store.get_document("sqlite")["chunks"])
    before = {d: chunk_ids(store, d) for d in ("sqlite", "hnsw", "python")}
    embedded = store.embedder.misses

    second = kr.refresh()          # nothing changed: two 304s, one full fetch whose hash matches
    assert second["not_modified"] == ["hnsw", "sqlite"] and second["unchanged"] == ["python"]
    assert HITS["not_modified"] == 2 and store.embedder.misses == embedded

    PAGES["/hnsw"] = ('"v2"', CORPUS["hnsw"] + " Deletions leave tombstones until a rebuild.", "text/plain")
    del PAGES["/python"]
    third = kr.refresh()
    assert third["updated"] == ["hnsw"] and third["removed"] == ["python"] and third["n_not_modified"] == 1
    assert chunk_ids(store, "sqlite") == before["sqlite"]                       # untouched
    assert chunk_ids(store, "hnsw") != before["hnsw"] and store.get_document("python") is None
    assert store.search("tombstones rebuild", k=1, mode="bm25")[0].doc_id == "hnsw"
    assert store.check()["consistent"]
    src = {s["doc_id"]: s for s in kr.sources()}
    assert src["hnsw"]["etag"] == '"v2"' and src["python"]["status"] == "removed"


def test_errors_and_allow_list(site, store):
    kr = KnowledgeRefresher(store, allow_hosts=["127.0.0.1:9"], timeout=2)
    with pytest.raises(ValueError, match="allow-list"):
        KnowledgeRefresher(store, allow_hosts=["example.org"]).add_url(site + "/sqlite")
    with pytest.raises(ValueError, match="http"):
        kr.add_url("ftp://127.0.0.1/x")
    kr.add_url("http://127.0.0.1:9/closed", doc_id="closed")        # nothing listens on port 9
    out = kr.refresh()
    assert out["n_errors"] == 1 and "failed" in out["errors"][0]["error"]


class Other(BaseHTTPRequestHandler):
    """A second server on another port of the same host: the allow-list must keep it unreached."""
    hits = 0

    def log_message(self, *a):
        pass

    def do_GET(self):
        Other.hits += 1
        data = b"internal admin page"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def test_allow_list_matches_the_port_for_requests_and_redirects(site, store):
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Other)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    other = f"http://127.0.0.1:{srv.server_address[1]}"
    Other.hits = 0
    try:
        PAGES["/escape"] = (None, other + "/admin", "redirect")
        with pytest.raises(ValueError, match="allow-list"):       # a bare host admits the default ports only
            KnowledgeRefresher(store, allow_hosts=["127.0.0.1"]).add_url(site + "/hnsw")
        kr = KnowledgeRefresher(store, allow_hosts=[site.split("//")[1]])
        with pytest.raises(ValueError, match="allow-list"):       # same host, another port
            kr.add_url(other + "/admin")
        with pytest.raises(ValueError, match="allow-list"):       # same host and port, another scheme
            KnowledgeRefresher(store, allow_hosts=["https" + site[4:]]).add_url(site + "/hnsw")
        kr.add_url(site + "/escape", doc_id="escape")
        kr.add_url(site + "/hnsw", doc_id="hnsw")
        out = kr.refresh()
        assert out["added"] == ["hnsw"] and [e["doc_id"] for e in out["errors"]] == ["escape"]
        assert "outside the allow-list" in out["errors"][0]["error"]
        assert Other.hits == 0 and store.get_document("escape") is None   # refused before the request was sent
        assert KnowledgeRefresher(store, allow_hosts=["127.0.0.1"]).refresh(["hnsw"])["n_errors"] == 1
        assert KnowledgeRefresher(store, allow_hosts=[site.split("//")[1], other]).refresh()["added"] == ["escape"]
        assert Other.hits == 1 and "internal admin page" in " ".join(store.get_document("escape")["chunks"])
    finally:
        srv.shutdown()
        srv.server_close()


def test_files_and_docs_rescan(tmp_path, store):
    files = {}
    for k in ("sqlite", "cooking"):
        files[k] = tmp_path / f"{k}.txt"
        files[k].write_text(CORPUS[k])
    kr = KnowledgeRefresher(store)
    for k, p in files.items():
        kr.add_path(p, doc_id=k)
    assert kr.refresh()["n_added"] == 2
    assert kr.refresh()["n_not_modified"] == 2                                   # size + mtime unchanged
    files["cooking"].write_text(CORPUS["cooking"].replace("two hours", "one hour"))
    os.utime(files["cooking"], (1, 1))
    out = kr.refresh()
    assert out["updated"] == ["cooking"] and out["not_modified"] == ["sqlite"]
    files["sqlite"].unlink()
    assert kr.refresh()["removed"] == ["sqlite"]

    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"id": k, "text": v}) + "\n" for k, v in CORPUS.items() if k != "weather"))
    assert kr.sync_docs(docs) == {"added": 4, "updated": 1, "unchanged": 0, "chunks": store.check()["chunks"], "removed": 0}
    docs.write_text("".join(json.dumps({"id": k, "text": v}) + "\n" for k, v in CORPUS.items() if k in ("hnsw", "python")))
    again = kr.sync_docs(docs)
    assert again["unchanged"] == 2 and again["removed"] == 3 and store.num_docs() == 2
