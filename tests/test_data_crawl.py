"""quark.data.crawl against real aiohttp servers on 127.0.0.1 with hostile pages: redirect loops,
404/500, slow responses, non-UTF-8, huge pages, gzip bombs, links to 10.x / 169.254.x, robots.txt;
and kill -9 in the middle of a crawl followed by a rerun (no page lost, none duplicated)."""
import asyncio
import gzip
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from aiohttp import web

from quark.config import ConfigError
from quark.data import crawl
from quark.data.shards import iter_records, shard_paths


class Server:
    """An aiohttp app served from a background thread; records every request path."""

    def __init__(self, app):
        self.app, self.requests, self.loop = app, [], asyncio.new_event_loop()
        ready = threading.Event()

        @web.middleware
        async def log(request, handler):
            self.requests.append(request.path_qs)
            return await handler(request)

        app.middlewares.append(log)

        def serve():
            asyncio.set_event_loop(self.loop)
            self.runner = web.AppRunner(app)
            self.loop.run_until_complete(self.runner.setup())
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            self.loop.run_until_complete(site.start())
            self.port = site._server.sockets[0].getsockname()[1]
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=serve, daemon=True)
        self.thread.start()
        ready.wait(10)
        self.base = f"http://127.0.0.1:{self.port}"

    def close(self):
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def page(title, body, links=()):
    a = "".join(f'<li><a href="{h}">{h}</a></li>' for h in links)
    return web.Response(text=f"<html><head><title>{title}</title></head><body><nav>menu</nav><main><p>{body}</p>"
                             f"<ul>{a}</ul></main><script>var x = 1;</script></body></html>", content_type="text/html")


def hostile_app():
    app = web.Application()
    flaky = {"n": 0}
    links = ["/loop-a", "/chain/9", "/missing", "/error", "/flaky", "/slow", "/latin1", "/badutf8", "/huge",
             "/huge-chunked", "/bomb", "/gzip", "/private-links", "/to-metadata", "/image.png", "/secret",
             "http://example.com/offsite", "/dup?b=2&a=1#frag", "/dup?a=1&b=2", "./dup?a=1&b=2#x", "/deep/1",
             "mailto:someone@example.com", "javascript:void(0)"]

    async def index(request):
        return page("Index", "The index page.", links)

    async def robots(request):
        return web.Response(text="User-agent: *\nDisallow: /secret\n")

    async def loop_a(request):
        raise web.HTTPFound("/loop-b")

    async def loop_b(request):
        raise web.HTTPFound("/loop-a")

    async def chain(request):
        n = int(request.match_info["n"])
        if n == 0:
            return page("End of chain", "reached")
        raise web.HTTPFound(f"/chain/{n - 1}")

    async def missing(request):
        raise web.HTTPNotFound()

    async def error(request):
        raise web.HTTPInternalServerError()

    async def flaky_page(request):
        flaky["n"] += 1
        if flaky["n"] == 1:
            raise web.HTTPServiceUnavailable()
        return page("Flaky", "Works on the second try.")

    async def slow(request):
        await asyncio.sleep(6)
        return page("Slow", "too late")

    async def latin1(request):
        body = "<html><head><title>Caf\u00e9</title></head><body><p>Un caf\u00e9 cr\u00e8me, s'il vous pla\u00eet.</p></body></html>"
        return web.Response(body=body.encode("latin-1"), headers={"Content-Type": "text/html; charset=iso-8859-1"})

    async def badutf8(request):
        return web.Response(body=b"<html><body><p>bad \xff\xfe bytes \xe9t\xe9 here</p></body></html>",
                            headers={"Content-Type": "text/html"})

    async def huge(request):
        return web.Response(body=b"<p>" + b"x" * 3_000_000 + b"</p>", content_type="text/html")

    async def huge_chunked(request):
        resp = web.StreamResponse(headers={"Content-Type": "text/html"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for _ in range(40):
            await resp.write(b"y" * 100_000)
        await resp.write_eof()
        return resp

    bomb_body = gzip.compress(b"<p>" + b"\0" * 50_000_000, 9)

    async def bomb(request):
        return web.Response(body=bomb_body, headers={"Content-Type": "text/html", "Content-Encoding": "gzip"})

    async def gz(request):
        body = gzip.compress(b"<html><head><title>Zipped</title></head><body><p>Compressed but fine.</p></body></html>")
        return web.Response(body=body, headers={"Content-Type": "text/html", "Content-Encoding": "gzip"})

    async def private_links(request):
        return page("Private", "Links to private addresses.",
                    ["http://10.0.0.1/admin", "http://169.254.169.254/latest/meta-data/",
                     f"http://localhost:{request.url.port}/via-localhost"])

    async def to_metadata(request):
        raise web.HTTPFound("http://169.254.169.254/latest/meta-data/")

    async def image(request):
        return web.Response(body=b"\x89PNG\r\n", content_type="image/png")

    async def secret(request):
        return page("Secret", "robots.txt forbids this")

    async def dup(request):
        return page("Dup", "one page, many spellings")

    async def deep(request):
        n = int(request.match_info["n"])
        return page(f"Deep {n}", f"level {n}", [f"/deep/{n + 1}"])

    app.router.add_get("/", index)
    app.router.add_get("/robots.txt", robots)
    app.router.add_get("/loop-a", loop_a)
    app.router.add_get("/loop-b", loop_b)
    app.router.add_get("/chain/{n}", chain)
    app.router.add_get("/missing", missing)
    app.router.add_get("/error", error)
    app.router.add_get("/flaky", flaky_page)
    app.router.add_get("/slow", slow)
    app.router.add_get("/latin1", latin1)
    app.router.add_get("/badutf8", badutf8)
    app.router.add_get("/huge", huge)
    app.router.add_get("/huge-chunked", huge_chunked)
    app.router.add_get("/bomb", bomb)
    app.router.add_get("/gzip", gz)
    app.router.add_get("/private-links", private_links)
    app.router.add_get("/to-metadata", to_metadata)
    app.router.add_get("/image.png", image)
    app.router.add_get("/secret", secret)
    app.router.add_get("/dup", dup)
    app.router.add_get("/deep/{n}", deep)
    return app


@pytest.fixture(scope="module")
def hostile():
    server = Server(hostile_app())
    yield server
    server.close()


def _cfg(server, **kw):
    cfg = {"seeds": [server.base + "/"], "allow_private_hosts": ["127.0.0.1"], "timeout": 2.5, "retries": 1,
           "backoff": 0.05, "max_body_bytes": 1_000_000, "max_decoded_bytes": 2_000_000, "max_redirects": 5,
           "max_depth": 3, "max_pages": 100, "seed": 0}
    cfg.update(kw)
    return cfg


def test_hostile_site(hostile, tmp_path):
    # 10.0.0.1 and 169.254.169.254 and localhost are in scope, so only the SSRF guard stops them.
    stats = crawl.run_step(tmp_path, _cfg(hostile, allowed_domains=["127.0.0.1", "10.0.0.1", "169.254.169.254",
                                                                    "localhost"]))
    recs = list(iter_records(shard_paths(tmp_path / "crawl", "pages")))
    by_path = {r["url"].split(str(hostile.port), 1)[1]: r for r in recs}
    assert len(by_path) == len(recs)  # no duplicates
    assert set(by_path) == {"/", "/flaky", "/latin1", "/badutf8", "/gzip", "/private-links",
                            "/dup?a=1&b=2", "/deep/1", "/deep/2", "/deep/3"}
    assert "robots.txt forbids" not in json.dumps(recs) and "/secret" not in hostile.requests
    assert by_path["/latin1"]["title"] == "Caf\u00e9" and "caf\u00e9 cr\u00e8me" in by_path["/latin1"]["text"]
    assert by_path["/badutf8"]["text"] == "bad \u00ff\u00fe bytes \u00e9t\u00e9 here"  # not UTF-8: cp1252 fallback
    assert by_path["/gzip"]["text"] == "Compressed but fine."
    index = by_path["/"]
    assert index["title"] == "Index" and index["status"] == 200 and index["fetched_at"].endswith("Z")
    assert "menu" not in index["text"] and "var x" not in index["text"]  # boilerplate and scripts dropped
    reasons = stats["reasons"]
    assert reasons["redirect loop"] == 1 and reasons["too many redirects"] == 1
    assert reasons["http 404"] == 1 and reasons["http 500"] == 1 and reasons["timeout"] == 1
    assert reasons["too large"] == 3          # Content-Length, chunked stream, gzip bomb
    assert reasons["blocked address"] == 4    # 10.x, 169.254.x, localhost, redirect to 169.254.x
    assert reasons["robots"] == 1 and reasons["content-type"] == 1
    assert hostile.requests.count("/dup?a=1&b=2") == 1  # URL spellings normalised to one
    assert stats["pages"] == len(recs) and json.loads((tmp_path / "crawl" / "stats.json").read_text())["pages"] == len(recs)

    # A finished crawl is a no-op when rerun.
    before = len(hostile.requests)
    assert crawl.run_step(tmp_path, _cfg(hostile, allowed_domains=["127.0.0.1", "10.0.0.1", "169.254.169.254",
                                                                   "localhost"]))["pages"] == len(recs)
    assert len(hostile.requests) == before


def test_max_pages_and_private_default(hostile, tmp_path):
    stats = crawl.run_step(tmp_path / "a", _cfg(hostile, max_pages=3))
    assert stats["pages"] == 3
    # Without allow_private the loopback seed itself is refused.
    stats = crawl.run_step(tmp_path / "b", _cfg(hostile, allow_private_hosts=[]))
    assert stats["pages"] == 0 and stats["reasons"] == {"blocked address": 1}


def test_url_normalisation():
    n = crawl.normalize_url
    assert n("HTTP://Example.COM:80/a/./b/../c?z=1&a=2#frag") == "http://example.com/a/c?a=2&z=1"
    assert n("https://user:pw@example.com:443") == "https://example.com/"
    assert n("../x y", "http://h.org/a/b/") == "http://h.org/a/x%20y"
    assert n("mailto:a@b.c") is None and n("javascript:alert(1)") is None and n("ftp://h/x") is None
    assert n("http://[::1]:8080/") == "http://[::1]:8080/"
    assert not crawl.ip_is_public("10.1.2.3") and not crawl.ip_is_public("169.254.169.254")
    assert not crawl.ip_is_public("127.0.0.1") and not crawl.ip_is_public("::ffff:192.168.0.1")
    assert crawl.ip_is_public("93.184.216.34")


def test_bad_config_names_the_key():
    with pytest.raises(ConfigError, match="crawl.seeds"):
        crawl.validate_config({"seeds": ["not a url"]})
    with pytest.raises(ConfigError, match="crawl.max_pages"):
        crawl.validate_config({"max_pages": 0})
    with pytest.raises(ConfigError, match="unknown key 'max_page'"):
        crawl.validate_config({"max_page": 3})


def many_pages_app(n):
    app = web.Application()

    async def node(request):
        i = int(request.match_info["i"])
        await asyncio.sleep(0.03)
        return page(f"Node {i}", f"Page number {i}.", [f"/n/{j}" for j in (2 * i + 1, 2 * i + 2) if j < n])

    app.router.add_get("/n/{i}", node)
    return app


@pytest.mark.slow
def test_kill_9_and_rerun_loses_and_duplicates_nothing(tmp_path):
    n = 60
    server = Server(many_pages_app(n))
    try:
        cfg = {"seeds": [server.base + "/n/0"], "allow_private_hosts": ["127.0.0.1"], "max_pages": 1000,
               "max_depth": 10, "concurrency": 4, "per_host_concurrency": 4, "shard_pages": 7, "obey_robots": False}
        code = f"from quark.data.crawl import run_step; run_step({str(tmp_path)!r}, {cfg!r})"
        env = dict(os.environ, TQDM_DISABLE="1")
        for kill_after in (8, 30):  # kill twice, at different points
            proc = subprocess.Popen([sys.executable, "-c", code], env=env)
            deadline = time.time() + 60
            while time.time() < deadline:
                lines = sum(p.read_bytes().count(b"\n") for p in shard_paths(tmp_path / "crawl", "pages"))
                if lines >= kill_after:
                    break
                time.sleep(0.01)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            assert lines >= kill_after
        stats = crawl.run_step(tmp_path, cfg)
        recs = list(iter_records(shard_paths(tmp_path / "crawl", "pages")))
        urls = [r["url"] for r in recs]
        assert len(urls) == len(set(urls)) == n == stats["pages"]
        assert set(urls) == {f"{server.base}/n/{i}" for i in range(n)}
        assert len(shard_paths(tmp_path / "crawl", "pages")) == -(-n // 7)
    finally:
        server.close()


# --- hostile pages that used to abort the whole crawl (issue 22.4) --------------------------------

def charset_app():
    app = web.Application()
    retried = {"n": 0}
    body = "<html><head>{meta}<title>{title}</title></head><body><main><p>caf\u00e9 {title}</p></main></body></html>"

    def html(title, ctype="text/html", meta=""):
        return web.Response(body=body.format(title=title, meta=meta).encode(), headers={"Content-Type": ctype})

    def serve(title, ctype="text/html", meta=""):
        async def handler(request):
            return html(title, ctype, meta)
        return handler

    async def index(request):
        return page("Index", "links", ["/hex", "/base64", "/rot13", "/undefined", "/idna", "/retry", "/secret"])

    async def robots(request):   # robotparser: "²".isdigit() is True, then int("²") raised
        return web.Response(text="User-agent: *\nCrawl-delay: \u00b2\nRequest-rate: \u00b2/\u00b2\nDisallow: /secret\n")

    async def retry(request):
        retried["n"] += 1
        if retried["n"] == 1:
            return web.Response(status=503, headers={"Retry-After": "\u00b2"})
        return html("retry")

    app.router.add_get("/", index)
    app.router.add_get("/robots.txt", robots)
    app.router.add_get("/hex", serve("hex", "text/html; charset=hex"))
    app.router.add_get("/base64", serve("base64", meta='<meta charset="base64">'))
    app.router.add_get("/rot13", serve("rot13", "text/html; charset=rot13"))
    app.router.add_get("/undefined", serve("undefined", meta='<meta charset="undefined">'))
    app.router.add_get("/idna", serve("idna", "text/html; charset=idna"))
    app.router.add_get("/retry", retry)
    app.router.add_get("/secret", serve("secret"))
    return app


def test_hostile_charsets_and_headers_fail_alone(tmp_path):
    server = Server(charset_app())
    try:
        stats = crawl.run_step(tmp_path, _cfg(server))
        recs = {r["url"].rsplit("/", 1)[1]: r for r in iter_records(shard_paths(tmp_path / "crawl", "pages"))}
        # Charsets that are not text encodings are ignored like unknown labels: the UTF-8 body decodes.
        assert set(recs) == {"", "hex", "base64", "rot13", "undefined", "idna", "retry"}
        for name in ("hex", "base64", "rot13", "undefined", "idna", "retry"):
            assert recs[name]["text"] == f"caf\u00e9 {name}"
        assert server.requests.count("/retry") == 2 and "/secret" not in server.requests   # robots still obeyed
        assert stats["urls"] == {"done": 7, "skipped": 1}
        before = len(server.requests)
        crawl.run_step(tmp_path, _cfg(server))
        assert len(server.requests) == before
    finally:
        server.close()


def test_a_page_that_raises_fails_alone_and_is_committed(tmp_path, monkeypatch):
    # Fault injection for the safety net: any exception while handling one page (here the HTML
    # extractor) fails that page, is recorded and committed, and the crawl goes on.
    server = Server(charset_app())
    extract = crawl.extract_html

    def fragile(html, url):
        if url.endswith("/rot13"):
            raise RuntimeError("extractor bug")
        return extract(html, url)

    monkeypatch.setattr(crawl, "extract_html", fragile)
    try:
        stats = crawl.run_step(tmp_path, _cfg(server))
        assert stats["pages"] == 6 and stats["reasons"]["page error: RuntimeError"] == 1
        before = len(server.requests)
        assert crawl.run_step(tmp_path, _cfg(server))["urls"]["failed"] == 1
        assert len(server.requests) == before   # committed as failed: a rerun does not die on it again
    finally:
        server.close()


# --- guards (issue 22.8) --------------------------------------------------------------------------

def test_transition_and_numeric_addresses_are_refused():
    for ip in ("64:ff9b::7f00:1", "64:ff9b::a00:1", "2002:7f00:1::", "2002:a9fe:a9fe::1", "::7f00:1", "::a00:1",
               "::ffff:7f00:1", "fec0::1", "64:ff9b:1::5db8:d822"):
        assert not crawl.ip_is_public(ip), ip
    for ip in ("64:ff9b::5db8:d822", "2002:5db8:d822::1", "::ffff:93.184.216.34", "2606:4700::1111"):
        assert crawl.ip_is_public(ip), ip   # the embedded IPv4 (or the IPv6 itself) is public
    for host in ("2130706433", "0x7f.1", "0X7F000001", "0177.0.0.1", "127.1", "127.0.1", "10.1", "1.2.3.4.5"):
        with pytest.raises(crawl.BlockedAddress, match="non-canonical"):
            crawl.check_literal_host(host, allow_private=True, trusted_hosts={host})
    crawl.check_literal_host("127.0.0.1", allow_private=True, trusted_hosts=set())
    crawl.check_literal_host("v1.example.com", allow_private=False, trusted_hosts=set())   # names go to the resolver


def guards_app():
    app = web.Application()
    app.times = []

    async def index(request):
        port = request.url.port
        hosts = ("2130706433", "0x7f.1", "0177.0.0.1", "127.1")
        numeric = [f"http://{h}:{port}/numeric/{i}" for i, h in enumerate(hosts)]
        return page("Index", "links", numeric + [f"/many/{i}" for i in range(50)] + ["/long/" + "x" * 3000])

    async def many(request):
        app.times.append(time.monotonic())
        return page("Many", request.path)

    async def robots(request):
        return web.Response(text="User-agent: *\nCrawl-delay: 100000\n")

    app.router.add_get("/", index)
    app.router.add_get("/robots.txt", robots)
    app.router.add_get("/many/{i}", many)
    app.router.add_get("/numeric/{i}", many)
    app.router.add_get("/long/{x}", many)
    return app


def test_numeric_hosts_crawl_delay_links_and_url_length_are_capped(tmp_path):
    server = Server(guards_app())
    try:
        cfg = _cfg(server, allow_private=True, allowed_domains=["127.0.0.1", "2130706433", "0x7f.1", "0177.0.0.1",
                                                                   "127.1"], max_pages=4, max_links_per_page=8,
                   max_crawl_delay=0.3, per_host_concurrency=1)
        t0 = time.monotonic()
        stats = crawl.run_step(tmp_path, cfg)
        assert time.monotonic() - t0 < 20   # Crawl-delay: 100000 is capped
        assert not any(p.startswith(("/numeric", "/long")) for p in server.requests)
        assert stats["reasons"]["blocked address"] == 4
        # 8 links kept of 55: the 4 numeric ones and the first 4 of /many (the 3000-character URL is never queued)
        assert sum(stats["urls"].values()) == 1 + 8
        gaps = [b - a for a, b in zip(server.app.times, server.app.times[1:])]
        assert len(gaps) == 2 and all(0.25 < g < 5 for g in gaps)   # the capped delay is still honoured
    finally:
        server.close()


def test_robots_fetch_stays_in_scope(tmp_path):
    app = web.Application()

    async def robots(request):
        raise web.HTTPFound(f"http://localhost:{request.url.port}/robots-elsewhere")

    async def elsewhere(request):
        return web.Response(text="User-agent: *\nAllow: /\n")

    async def index(request):
        return page("Index", "text")

    app.router.add_get("/", index)
    app.router.add_get("/robots.txt", robots)
    app.router.add_get("/robots-elsewhere", elsewhere)
    server = Server(app)
    try:
        # localhost is trusted, so only the scope (127.0.0.1) can stop the robots.txt redirect.
        stats = crawl.run_step(tmp_path, _cfg(server, allow_private_hosts=["127.0.0.1", "localhost"]))
        assert "/robots-elsewhere" not in server.requests
        assert stats["reasons"] == {"robots": 1}   # robots.txt unreachable within scope: disallow all (RFC 9309)
    finally:
        server.close()
