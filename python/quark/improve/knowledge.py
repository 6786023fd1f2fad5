"""Knowledge refresh: re-crawl or re-scan the sources behind a retrieval store, find the documents
that changed, and update only their chunks.

Change detection, cheapest test first:
- URLs: a conditional GET with the ETag / Last-Modified the server gave last time; 304 Not Modified
  costs no body and no embedding. A 200 body is hashed, and an unchanged hash (a server without
  validators, or a touched page) still skips the update. 404/410 removes the document.
- Files: (size, mtime) as recorded last time, then the content hash. A missing file removes the document.
- A docs.jsonl re-scan (the dedup step's output): the store compares content hashes itself.
Changed documents go through Store.upsert (only their chunks are re-chunked and re-embedded); the
validators are recorded in a `sources` table in the store's own SQLite file, after the document is
updated, so a crash in between only costs one redundant fetch next time.
"""
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

from quark.io import read_jsonl
from quark.retrieval.embed import content_hash
from quark.retrieval.tools import AllowList

SOURCES = """
CREATE TABLE IF NOT EXISTS sources (
    doc_id TEXT PRIMARY KEY, location TEXT NOT NULL, kind TEXT NOT NULL, meta TEXT NOT NULL DEFAULT '{}',
    etag TEXT, last_modified TEXT, size INTEGER, mtime REAL, hash TEXT, checked_at REAL, status TEXT);
"""


class _Text(HTMLParser):
    """Visible text of an HTML page (script/style dropped, block elements become line breaks)."""
    BLOCKS = {"p", "div", "br", "li", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "pre", "section", "article", "dt", "dd"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts, self.skip, self.title = [], 0, None
        self._in_title = False

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "style", "noscript"):
            self.skip += 1
        elif tag == "title":
            self._in_title = True
        elif tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in ("script", "style", "noscript") and self.skip:
            self.skip -= 1
        elif tag == "title":
            self._in_title = False

    def handle_data(self, data):
        if self._in_title:
            self.title = (self.title or "") + data
        elif not self.skip:
            self.parts.append(data)


def html_to_text(html):
    p = _Text()
    p.feed(html)
    lines = (" ".join(line.split()) for line in "".join(p.parts).splitlines())
    return "\n".join(line for line in lines if line), (p.title or "").strip() or None


class _AllowedRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to an allowed origin, checked before the new request is sent."""

    def __init__(self, allow):
        self.allow = allow

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if self.allow is not None and self.allow.match(newurl) is None:
            fp.close()
            raise RefreshError(f"{req.full_url} redirected to {newurl}, outside the allow-list")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class KnowledgeRefresher:
    """allow_hosts: the origins URLs (and their redirects) may reach, as quark.retrieval.tools.AllowList
    reads them ("scheme://host[:port]", "host:port", or "host" for the default ports only); None: any."""

    def __init__(self, store, timeout=10.0, max_bytes=5 << 20, allow_hosts=None):
        self.store = store
        self.timeout, self.max_bytes = timeout, max_bytes
        self.allow = AllowList(allow_hosts) if allow_hosts is not None else None
        self.opener = urllib.request.build_opener(_AllowedRedirects(self.allow))
        with store.lock:
            store.db.executescript(SOURCES)

    # -------------------------------------------------------------------------- registering
    def add_url(self, url, doc_id=None, meta=None):
        p = urllib.parse.urlsplit(url)
        if p.scheme not in ("http", "https") or not p.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        if self.allow is not None and self.allow.match(url) is None:
            raise ValueError(f"origin of {url!r} is not in the allow-list")
        return self._add(doc_id or url, url, "url", meta)

    def add_path(self, path, doc_id=None, meta=None):
        path = str(Path(path).resolve())
        return self._add(doc_id or path, path, "file", meta)

    def _add(self, doc_id, location, kind, meta):
        with self.store.lock:
            self.store.db.execute("INSERT INTO sources (doc_id, location, kind, meta) VALUES (?, ?, ?, ?) "
                                  "ON CONFLICT(doc_id) DO UPDATE SET location=excluded.location, kind=excluded.kind, "
                                  "meta=excluded.meta", (doc_id, location, kind, json.dumps(meta or {})))
        return doc_id

    def sources(self):
        cols = ("doc_id", "location", "kind", "meta", "etag", "last_modified", "size", "mtime", "hash", "checked_at", "status")
        with self.store.lock:
            return [dict(zip(cols, r)) for r in self.store.db.execute(f"SELECT {', '.join(cols)} FROM sources ORDER BY doc_id")]

    # -------------------------------------------------------------------------- refreshing
    def refresh(self, doc_ids=None):
        """Check every registered source (or doc_ids) -> counts and the ids per outcome."""
        out = {k: [] for k in ("not_modified", "unchanged", "updated", "added", "removed", "errors")}
        for src in self.sources():
            if doc_ids is not None and src["doc_id"] not in doc_ids:
                continue
            try:
                outcome, record = (self._check_url if src["kind"] == "url" else self._check_file)(src)
            except RefreshError as e:
                out["errors"].append({"doc_id": src["doc_id"], "error": str(e)})
                self._record(src["doc_id"], {"status": f"error: {e}"})
                continue
            out[outcome].append(src["doc_id"])
            self._record(src["doc_id"], {**record, "status": outcome})
        return {**{f"n_{k}": len(v) for k, v in out.items()}, **out}

    def _record(self, doc_id, fields):
        fields = {**fields, "checked_at": time.time()}
        sets = ", ".join(f"{k}=?" for k in fields)
        with self.store.lock:
            self.store.db.execute(f"UPDATE sources SET {sets} WHERE doc_id=?", [*fields.values(), doc_id])

    def _apply(self, src, text, title=None):
        """Upsert the document if its content changed -> outcome."""
        meta = json.loads(src["meta"])
        if title:
            meta.setdefault("title", title)
        stats = self.store.upsert([{"id": src["doc_id"], "text": text, "source": src["location"], "meta": meta}])
        return "added" if stats["added"] else "updated" if stats["updated"] else "unchanged"

    def _remove(self, src):
        self.store.delete([src["doc_id"]])
        return "removed"

    def _check_file(self, src):
        path = Path(src["location"])
        if not path.exists():
            return self._remove(src), {"hash": None, "size": None, "mtime": None}
        st = path.stat()
        if src["size"] == st.st_size and src["mtime"] == st.st_mtime and src["hash"]:
            return "not_modified", {}
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            raise RefreshError(f"cannot read {path}: {e}") from None
        outcome = self._apply(src, text)
        return outcome, {"size": st.st_size, "mtime": st.st_mtime, "hash": content_hash(text)}

    def _check_url(self, src):
        headers = {"User-Agent": "quark-knowledge-refresh", "Accept": "text/html, text/plain, application/json"}
        if src["etag"]:
            headers["If-None-Match"] = src["etag"]
        if src["last_modified"]:
            headers["If-Modified-Since"] = src["last_modified"]
        if self.allow is not None and self.allow.match(src["location"]) is None:   # registered under another list
            raise RefreshError(f"origin of {src['location']} is not in the allow-list")
        req = urllib.request.Request(src["location"], headers=headers)
        try:
            with self.opener.open(req, timeout=self.timeout) as resp:
                body = resp.read(self.max_bytes + 1)
                if len(body) > self.max_bytes:
                    raise RefreshError(f"{src['location']} is larger than {self.max_bytes} bytes")
                charset = resp.headers.get_content_charset() or "utf-8"
                ctype = resp.headers.get_content_type()
                etag, modified = resp.headers.get("ETag"), resp.headers.get("Last-Modified")
        except urllib.error.HTTPError as e:
            e.close()
            if e.code == 304:
                return "not_modified", {}
            if e.code in (404, 410):
                return self._remove(src), {"etag": None, "last_modified": None, "hash": None}
            raise RefreshError(f"HTTP {e.code} from {src['location']}") from None
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            raise RefreshError(f"fetching {src['location']} failed: {getattr(e, 'reason', e)}") from None
        text, title = body.decode(charset, "replace"), None
        if ctype == "text/html":
            text, title = html_to_text(text)
        if not text.strip():
            raise RefreshError(f"{src['location']} has no text")
        outcome = self._apply(src, text, title)
        return outcome, {"etag": etag, "last_modified": modified, "hash": content_hash(text)}

    def sync_docs(self, docs_jsonl, delete_missing=True):
        """Re-scan a docs.jsonl ({id, text, source, meta}): update changed documents, add new ones and
        (by default) delete documents the file no longer has -> counts."""
        docs = []
        for n, rec in read_jsonl(docs_jsonl):
            if not isinstance(rec, dict) or not isinstance(rec.get("id"), str) or not isinstance(rec.get("text"), str):
                raise ValueError(f"{docs_jsonl}:{n}: expected a record with string 'id' and 'text'")
            docs.append({"id": rec["id"], "text": rec["text"], "source": rec.get("source"),
                         "meta": rec.get("meta") if isinstance(rec.get("meta"), dict) else {}})
        stats = self.store.upsert(docs)
        gone = []
        if delete_missing:
            keep = {d["id"] for d in docs}
            gone = [i for i in self.store.doc_hashes() if i not in keep]
            self.store.delete(gone)
        return {**stats, "removed": len(gone)}


class RefreshError(Exception):
    pass
