"""Web crawler (pipeline step `crawl`): seeds or sitemaps -> run_dir/crawl/pages-*.jsonl records
{url, title, text, fetched_at, status, depth, bytes}.

Politeness and safety: same-host (or allow-listed domain) scope, robots.txt obeyed (RFC 9309: 4xx
means allow all, 5xx or unreachable means disallow all, Crawl-delay honoured), a per-host
concurrency limit and delay, retries with exponential backoff on timeouts / connection errors /
429 / 5xx (Retry-After honoured), a redirect limit with loop detection, a content-type filter,
and caps on the compressed body and on the decompressed body (decompression is done here, a
bounded chunk at a time, so a gzip bomb stops at the cap). SSRF guard: private, loopback,
link-local and other non-global addresses are refused unless `allow_private` (or the host is in
`allow_private_hosts`); the check runs in the DNS resolver that the connections use (after
resolution, so a public name pointing at 169.254.169.254 is refused) and on literal IPs, for every
hop of a redirect chain; IPv6 transition forms (IPv4-mapped, -compatible, 6to4, NAT64) are judged by
the IPv4 address they carry, and non-canonical numeric hosts (2130706433, 0x7f.1, 127.1) are refused.
A page that fails in any way (a charset that is no text encoding, a malformed header) fails alone:
its URL is committed as failed with the reason, and the crawl goes on.

Crash safety: the frontier (every URL seen, its depth and state) is a SQLite database next to the
shards, and each fetched page is committed in one SQLite transaction that marks the URL done,
queues its links and records the fsynced end position of the page shard. A rerun truncates the
shard back to that position and refetches whatever was in flight, so kill -9 loses no page and
duplicates none.

Embedded default (seeds: pydoc): Python's own pydoc documentation server is started on 127.0.0.1
and crawled with allow_private for that loopback host only. It runs in a child process rather
than a thread: rendering a module's page imports the module, and those imports (and their side
effects) stay out of this process, and the server does not compete with the crawler for the GIL.
"""
import asyncio
import codecs
import contextlib
import ipaddress
import json
import os
import re
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.robotparser
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union
from urllib.parse import parse_qsl, quote, urlencode, urljoin, urlsplit, urlunsplit

import aiohttp
from aiohttp.abc import AbstractResolver
from aiohttp.resolver import ThreadedResolver
# selectolax (the Lexbor HTML5 engine in C): parses real-world broken HTML the way browsers do,
# an order of magnitude faster than BeautifulSoup/lxml-based extractors, and its node API lets us
# drop boilerplate elements and walk the rest block by block in a few lines. trafilatura scores
# main content better but pulls in a large dependency tree and is several times slower.
from selectolax.lexbor import LexborHTMLParser
from tqdm import tqdm

from quark.config import ConfigError, Step, from_dict
from quark.data.shards import ShardWriter, shard_paths
from quark.io import atomic_write_json
from quark.rundir import RunDir


@dataclass
class CrawlConfig:
    seeds: Union[str, list[str]] = "pydoc"   # "pydoc" or URLs; a URL ending in .xml is read as a sitemap
    allowed_domains: list[str] = field(default_factory=list)  # empty: the seeds' hosts (and their subdomains)
    exclude: list[str] = field(default_factory=list)          # regexes; matching URLs are never queued
    max_pages: int = 300
    max_depth: int = 3
    max_bytes: int = 200_000_000          # stop queueing once this many decoded bytes were downloaded
    max_body_bytes: int = 5_000_000       # cap on the bytes on the wire (compressed) per response
    max_decoded_bytes: int = 10_000_000   # cap on the decompressed body per response (gzip bombs)
    concurrency: int = 8                  # requests in flight in total
    per_host_concurrency: int = 2
    delay: float = 0.0                    # seconds between request starts to one host (robots Crawl-delay wins if larger)
    max_crawl_delay: float = 30.0         # cap on robots.txt Crawl-delay (a hostile 10**9 stalls the host forever)
    max_links_per_page: int = 1000        # links queued from one page (a million links would flood the frontier)
    max_url_length: int = 2048            # longer URLs are never queued (the sitemaps protocol limit)
    timeout: float = 20.0                 # seconds per request (connect, each read, and in total)
    retries: int = 2                      # extra attempts after a timeout, connection error, 429 or 5xx
    backoff: float = 0.5                  # first retry waits this long, then doubles
    max_redirects: int = 5
    content_types: list[str] = field(default_factory=lambda: ["text/html", "application/xhtml+xml", "text/plain"])
    obey_robots: bool = True
    allow_private: bool = False
    allow_private_hosts: list[str] = field(default_factory=list)
    user_agent: str = "QuarkCrawler/0.1"
    shard_pages: int = 1000
    seed: int = 0

    def __post_init__(self):
        for key in ("max_pages", "max_bytes", "max_body_bytes", "max_decoded_bytes", "concurrency",
                    "per_host_concurrency", "shard_pages", "max_links_per_page", "max_url_length"):
            if getattr(self, key) < 1:
                raise ConfigError(f"crawl.{key}: must be >= 1, got {getattr(self, key)}")
        for key in ("max_depth", "retries", "max_redirects"):
            if getattr(self, key) < 0:
                raise ConfigError(f"crawl.{key}: must be >= 0, got {getattr(self, key)}")
        for key in ("delay", "backoff", "max_crawl_delay"):
            if getattr(self, key) < 0:
                raise ConfigError(f"crawl.{key}: must be >= 0, got {getattr(self, key)}")
        if self.timeout <= 0:
            raise ConfigError(f"crawl.timeout: must be > 0, got {self.timeout}")
        seeds = [self.seeds] if isinstance(self.seeds, str) else self.seeds
        if not seeds:
            raise ConfigError("crawl.seeds: give 'pydoc' or at least one http(s) URL")
        for s in seeds:
            if s != "pydoc" and normalize_url(s) is None:
                raise ConfigError(f"crawl.seeds: {s!r} is not an http(s) URL")
        for pattern in self.exclude:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ConfigError(f"crawl.exclude: {pattern!r} is not a valid regex ({e})") from None


def validate_config(cfg):
    from_dict(CrawlConfig, cfg, "crawl")


# --- URLs -----------------------------------------------------------------------------------------

def _remove_dot_segments(path):
    out = []
    for seg in path.split("/"):
        if seg == "..":
            if len(out) > 1:
                out.pop()
        elif seg != ".":
            out.append(seg)
    result = "/".join(out)
    if path.endswith(("/.", "/..")):
        result += "/"
    return result if result.startswith("/") else "/" + result


def normalize_url(url, base=None):
    """Canonical form used for dedup, or None if not a crawlable http(s) URL: lowercase scheme and
    host (IDNA), default port and fragment and credentials dropped, dot segments resolved, unsafe
    characters percent-encoded, query parameters sorted."""
    try:
        parts = urlsplit(urljoin(base, url.strip()) if base else url.strip())
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or not parts.hostname:
            return None
        host = parts.hostname.rstrip(".").encode("idna").decode("ascii").lower()
        port = parts.port
    except (ValueError, UnicodeError):
        return None
    netloc = f"[{host}]" if ":" in host else host
    if port and port != {"http": 80, "https": 443}[scheme]:
        netloc += f":{port}"
    path = quote(_remove_dot_segments(parts.path or "/"), safe="/%:@!$&'()*+,;=-._~")
    query = urlencode(sorted(parse_qsl(parts.query, keep_blank_values=True)), doseq=True) if parts.query else ""
    return urlunsplit((scheme, netloc, path, query, ""))


def host_in_scope(host, domains):
    return any(host == d or host.endswith("." + d) for d in domains)


def origin_of(url):
    p = urlsplit(url)
    return f"{p.scheme}://{p.netloc}"


# --- SSRF guard -----------------------------------------------------------------------------------

class BlockedAddress(OSError):
    """A host resolved to (or is) an address the crawler must not connect to."""


_NAT64 = ipaddress.ip_network("64:ff9b::/96")             # RFC 6052 well-known prefix: IPv4 in the last 32 bits
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")     # RFC 8215 local-use translation: never public
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")          # deprecated ::a.b.c.d (also :: and ::1)


def ip_is_public(ip):
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address):
        # Transition forms carry an IPv4 address that a gateway (or the kernel) may dial: judge that one.
        embedded = addr.ipv4_mapped or addr.sixtofour
        if embedded is None and (addr in _NAT64 or addr in _IPV4_COMPATIBLE):
            embedded = ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
        if embedded is not None:
            addr = embedded
        elif addr in _NAT64_LOCAL or addr.is_site_local:   # fec0::/10: deprecated but still routed locally
            return False
    # is_global is False for private, loopback, link-local (169.254/16, fe80::/10), shared
    # (100.64/10), reserved and unspecified ranges; multicast is not a web server either.
    return addr.is_global and not addr.is_multicast


class GuardedResolver(AbstractResolver):
    """The resolver of every connection the crawler opens: keeps only public addresses (unless
    the host is trusted), so the check happens after DNS, on the address actually dialled."""

    def __init__(self, allow_private, trusted_hosts):
        self._inner = ThreadedResolver()
        self._allow_private, self._trusted = allow_private, set(trusted_hosts)

    async def resolve(self, host, port=0, family=socket.AF_INET):
        infos = await self._inner.resolve(host, port, family)
        if self._allow_private or host in self._trusted:
            return infos
        public = [r for r in infos if ip_is_public(r["host"])]
        if not public:
            raise BlockedAddress(f"{host} resolves only to non-public addresses {[r['host'] for r in infos]}")
        return public

    async def close(self):
        await self._inner.close()


# The last label of a host that URL parsers (WHATWG, inet_aton, getaddrinfo) read as an IPv4 number.
_NUMERIC_LABEL = re.compile(r"0x[0-9a-f]*|[0-9]+", re.I)


def check_literal_host(host, allow_private, trusted_hosts):
    """aiohttp skips the resolver for IP literals, so those are checked here before connecting.
    Other numeric forms (2130706433, 0x7f.1, 0177.0.0.1, 127.1) are refused outright, allowed
    or not: parsers disagree on what they mean, so no allow-list entry can name them safely."""
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        if _NUMERIC_LABEL.fullmatch(host.rstrip(".").rsplit(".", 1)[-1]):
            raise BlockedAddress(f"{host} is a numeric host in a non-canonical form (decimal, octal, hex or "
                                 f"shortened IPv4)") from None
        return  # a name: GuardedResolver checks what it resolves to
    if not (allow_private or host in trusted_hosts or ip_is_public(host.strip("[]"))):
        raise BlockedAddress(f"{host} is a non-public address")


# --- bodies and HTML ------------------------------------------------------------------------------

class TooLarge(Exception):
    pass


async def read_body(resp, max_body_bytes, max_decoded_bytes):
    """The decoded body, refusing more than max_body_bytes on the wire or max_decoded_bytes after
    decompression (decompressed here a bounded chunk at a time: a 10 GB gzip bomb costs at most
    max_decoded_bytes + one chunk of memory)."""
    length = resp.headers.get("Content-Length")
    if length and length.isdigit() and int(length) > max_body_bytes:
        raise TooLarge(f"Content-Length {length} > max_body_bytes {max_body_bytes}")
    encoding = resp.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        dec = None
    elif encoding in ("gzip", "x-gzip"):
        dec = zlib.decompressobj(16 + zlib.MAX_WBITS)
    elif encoding == "deflate":
        dec = zlib.decompressobj(32 + zlib.MAX_WBITS)  # zlib-wrapped (RFC 9110); raw deflate handled below
    else:
        raise ValueError(f"unsupported Content-Encoding {encoding!r}")
    raw, out = 0, bytearray()
    async for chunk in resp.content.iter_chunked(1 << 16):
        raw += len(chunk)
        if raw > max_body_bytes:
            raise TooLarge(f"body over max_body_bytes {max_body_bytes}")
        if dec is None:
            out += chunk
        else:
            try:
                out += dec.decompress(chunk, max_decoded_bytes - len(out) + 1)
            except zlib.error:
                if encoding != "deflate" or raw != len(chunk):
                    raise ValueError("corrupt compressed body") from None
                dec = zlib.decompressobj(-zlib.MAX_WBITS)  # some servers send raw deflate
                out += dec.decompress(chunk, max_decoded_bytes - len(out) + 1)
            if dec.unconsumed_tail:
                raise TooLarge(f"decompressed body over max_decoded_bytes {max_decoded_bytes}")
        if len(out) > max_decoded_bytes:
            raise TooLarge(f"decompressed body over max_decoded_bytes {max_decoded_bytes}")
    if dec is not None:
        out += dec.flush()
        if len(out) > max_decoded_bytes:
            raise TooLarge(f"decompressed body over max_decoded_bytes {max_decoded_bytes}")
    return bytes(out)


_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([A-Za-z0-9_.:-]+)""", re.I)


def decode_text(body, content_type):
    """bytes -> str: BOM, then the header charset, then a <meta> charset in the first 4 KiB, then
    UTF-8; undecodable bytes become U+FFFD (falling back to cp1252 when the body is not UTF-8).
    A charset that is not a text encoding (hex, base64, rot13) or that cannot decode at all
    (undefined, idna) is ignored, as browsers ignore unknown labels."""
    for bom, enc in ((codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16")):
        if body.startswith(bom):
            return body.decode(enc, errors="replace")
    candidates = []
    m = re.search(r"charset\s*=\s*[\"']?([A-Za-z0-9_.:-]+)", content_type or "", re.I)
    if m:
        candidates.append(m.group(1))
    m = _META_CHARSET.search(body[:4096])
    if m:
        candidates.append(m.group(1).decode("ascii"))
    for name in candidates:
        try:
            return body.decode(name, errors="replace")
        except (LookupError, UnicodeError):
            continue
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        return body.decode("cp1252", errors="replace")


_SKIP_TAGS = {"script", "style", "noscript", "template", "svg", "iframe", "object", "head", "nav", "header",
              "footer", "aside", "form", "button", "select", "textarea", "-comment"}
_BLOCK_TAGS = {"p", "div", "section", "article", "main", "br", "hr", "li", "ul", "ol", "dl", "dt", "dd", "table",
               "tr", "td", "th", "thead", "tbody", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "blockquote",
               "figure", "figcaption", "caption", "address", "details", "summary", "body", "html"}


def _block_text(root):
    """Text of `root` with a line break at every block element and inline runs kept on one line
    (iterative: hostile pages nest elements far deeper than Python's recursion limit)."""
    parts, stack = [], [(root, False)]
    while stack:
        node, closing = stack.pop()
        tag = node.tag
        if closing:
            parts.append("\n")
            continue
        if tag == "-text":
            parts.append(node.text_content or "")
            continue
        if tag in _SKIP_TAGS:
            continue
        block = tag in _BLOCK_TAGS
        if block:
            parts.append("\n")
            stack.append((node, True))
        children = []
        child = node.first_child
        while child is not None:
            children.append(child)
            child = child.next
        stack.extend((c, False) for c in reversed(children))
    lines = (re.sub(r"\s+", " ", line).strip() for line in "".join(parts).split("\n"))
    return "\n".join(line for line in lines if line)


def extract_html(html, url):
    """-> (title, main text, absolute links, noindex, nofollow). Links come from the whole page
    (navigation included); text comes from <main>/<article>/[role=main] when the page has one,
    else from <body>, without scripts, styles and navigation/header/footer/aside boilerplate."""
    tree = LexborHTMLParser(html)
    title_node = tree.css_first("title")
    title = re.sub(r"\s+", " ", title_node.text()).strip() if title_node else ""
    robots = " ".join((m.attributes.get("content") or "").lower() for m in tree.css('meta[name="robots" i]'))
    base_node = tree.css_first("base[href]")
    base = urljoin(url, base_node.attributes.get("href") or "") if base_node else url
    links = []
    if "nofollow" not in robots:
        for a in tree.css("a[href]"):
            if "nofollow" in (a.attributes.get("rel") or "").lower():
                continue
            link = normalize_url(a.attributes.get("href") or "", base)
            if link:
                links.append(link)
    root = tree.css_first("main") or tree.css_first("article") or tree.css_first('[role="main"]') or tree.body
    text = _block_text(root) if root is not None else ""
    return title, text, links, "noindex" in robots, "nofollow" in robots


def sitemap_locs(body):
    """<loc> URLs of a sitemap or sitemap index."""
    return [m.decode("utf-8", "replace").strip() for m in re.findall(rb"<loc>\s*([^<\s]+)\s*</loc>", body)]


def _robots_lines(text):
    """robots.txt lines for urllib.robotparser, without Crawl-delay / Request-rate lines that would
    make it raise: it checks str.isdigit(), which accepts "²", then int() fails on it (and on more
    than 4300 digits)."""
    return [line for line in text.splitlines()
            if not (re.match(r"\s*(crawl-delay|request-rate)\s*:", line, re.I)
                    and not (line.isascii() and len(line) < 100))]


# --- frontier -------------------------------------------------------------------------------------

class Frontier:
    """Every URL seen (url, depth, state, status, reason) and the committed page-shard position,
    in SQLite. States: queued -> done | failed | skipped."""

    def __init__(self, path):
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("""CREATE TABLE IF NOT EXISTS urls (id INTEGER PRIMARY KEY AUTOINCREMENT,
            url TEXT UNIQUE NOT NULL, depth INTEGER NOT NULL, state TEXT NOT NULL DEFAULT 'queued',
            status INTEGER, reason TEXT, stored INTEGER NOT NULL DEFAULT 0, bytes INTEGER NOT NULL DEFAULT 0)""")
        self.db.execute("CREATE INDEX IF NOT EXISTS urls_queue ON urls(state, depth, id)")
        self.db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")

    def get(self, key, default=None):
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def put(self, key, value):
        self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))

    def add(self, urls, depth):
        self.db.executemany("INSERT OR IGNORE INTO urls (url, depth) VALUES (?, ?)", [(u, depth) for u in urls])

    def queued(self, limit):
        return self.db.execute("SELECT url, depth FROM urls WHERE state = 'queued' ORDER BY depth, id LIMIT ?",
                               (limit,)).fetchall()

    def is_stored(self, url):
        row = self.db.execute("SELECT stored FROM urls WHERE url = ?", (url,)).fetchone()
        return bool(row and row[0])

    def commit(self, url, state, status, reason, links, link_depth, final_url=None, stored=False, nbytes=0,
               position=None):
        """One transaction: the URL's outcome, its links, and the page-shard position."""
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute("UPDATE urls SET state = ?, status = ?, reason = ?, stored = ?, bytes = ? WHERE url = ?",
                            (state, status, reason, int(stored and final_url in (None, url)), nbytes, url))
            if final_url and final_url != url:  # the redirect target is fetched too: never queue it again
                self.db.execute("INSERT OR IGNORE INTO urls (url, depth) VALUES (?, ?)", (final_url, link_depth - 1))
                self.db.execute("UPDATE urls SET state = 'done', status = ? WHERE url = ? AND state = 'queued'",
                                (status, final_url))
                if stored:
                    self.db.execute("UPDATE urls SET stored = 1 WHERE url = ?", (final_url,))
            if links:
                self.add(links, link_depth)
            if position is not None:
                self.put("position", position)

    def rewrite_origin(self, old, new):
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute("UPDATE urls SET url = ? || substr(url, ?) WHERE substr(url, 1, ?) = ?",
                            (new, len(old) + 1, len(old), old))

    def counts(self):
        stored, nbytes = self.db.execute("SELECT COALESCE(SUM(stored), 0), COALESCE(SUM(bytes), 0) FROM urls").fetchone()
        by_state = dict(self.db.execute("SELECT state, COUNT(*) FROM urls GROUP BY state").fetchall())
        reasons = dict(self.db.execute("SELECT reason, COUNT(*) FROM urls WHERE reason IS NOT NULL GROUP BY reason"
                                       " ORDER BY COUNT(*) DESC").fetchall())
        return {"pages": int(stored), "bytes": int(nbytes), "urls": by_state, "reasons": reasons}

    def close(self):
        self.db.close()


# --- the crawler ----------------------------------------------------------------------------------

RETRY_STATUSES = {429, 500, 502, 503, 504}


class FetchFailed(Exception):
    def __init__(self, reason, status=None):
        super().__init__(reason)
        self.reason, self.status = reason, status


@dataclass
class Hop:
    status: int
    url: str
    location: str = None
    content_type: str = ""
    body: bytes = None


class Crawler:
    def __init__(self, cfg, out_dir, seeds, scope, trusted_hosts, exclude, log=None):
        self.cfg, self.out_dir = cfg, Path(out_dir)
        self.seeds, self.scope, self.trusted = seeds, scope, set(trusted_hosts)
        self.exclude = [re.compile(p) for p in exclude]
        self.frontier = Frontier(self.out_dir / "frontier.sqlite")
        self.writer = ShardWriter(self.out_dir, "pages", cfg.shard_pages, self.frontier.get("position"))
        counts = self.frontier.counts()
        self.stored, self.bytes = counts["pages"], counts["bytes"]
        self.in_flight = set()
        self.robots, self.robots_locks = {}, {}
        self.host_sems, self.next_slot, self.crawl_delay = {}, {}, {}
        self.log = log

    def in_scope(self, url):
        return len(url) <= self.cfg.max_url_length and host_in_scope(urlsplit(url).hostname or "", self.scope)

    def wanted(self, url):
        return self.in_scope(url) and not any(p.search(url) for p in self.exclude)

    # scheduling
    def claim(self):
        if self.stored + len(self.in_flight) >= self.cfg.max_pages or self.bytes >= self.cfg.max_bytes:
            return None
        for url, depth in self.frontier.queued(len(self.in_flight) + 1):
            if url not in self.in_flight:
                self.in_flight.add(url)
                return url, depth
        return None

    async def worker(self, cond, bar):
        while True:
            async with cond:
                while (job := self.claim()) is None:
                    if not self.in_flight:
                        return
                    await cond.wait()
            url, depth = job
            try:
                try:
                    res = await self.fetch_page(url, depth)
                except Exception as e:   # one hostile page fails alone: recorded and committed, never refetched
                    res = {"state": "failed", "reason": f"page error: {type(e).__name__}"}
                self.process_result(url, depth, res, bar)
            finally:
                async with cond:
                    self.in_flight.discard(url)
                    cond.notify_all()

    # politeness
    @contextlib.asynccontextmanager
    async def host_gate(self, host):
        sem = self.host_sems.setdefault(host, asyncio.Semaphore(self.cfg.per_host_concurrency))
        async with sem:
            loop = asyncio.get_running_loop()
            now = loop.time()
            start = max(now, self.next_slot.get(host, now))
            self.next_slot[host] = start + max(self.cfg.delay, self.crawl_delay.get(host, 0.0))
            if start > now:
                await asyncio.sleep(start - now)
            yield

    async def request(self, url, allowed_types, max_body=None):
        """One hop (no redirect following), with retries; -> Hop. Raises FetchFailed."""
        parts = urlsplit(url)
        cfg = self.cfg
        for attempt in range(cfg.retries + 1):
            retry_after = None
            try:
                check_literal_host(parts.hostname, cfg.allow_private, self.trusted)
                async with self.host_gate(parts.netloc):
                    async with self.session.get(url, allow_redirects=False) as resp:
                        status, ctype = resp.status, resp.headers.get("Content-Type", "")
                        if 300 <= status < 400 and "Location" in resp.headers:
                            return Hop(status, url, location=resp.headers["Location"])
                        if status in RETRY_STATUSES and attempt < cfg.retries:
                            retry_after = resp.headers.get("Retry-After", "")
                            raise FetchFailed(f"http {status}", status)
                        if status != 200:
                            return Hop(status, url, content_type=ctype)
                        mime = ctype.split(";", 1)[0].strip().lower()
                        if allowed_types is not None and mime not in allowed_types:
                            return Hop(status, url, content_type=ctype)
                        body = await read_body(resp, max_body or cfg.max_body_bytes, cfg.max_decoded_bytes)
                        return Hop(status, url, content_type=ctype, body=body)
            except BlockedAddress as e:
                raise FetchFailed("blocked address") from e
            except aiohttp.ClientConnectorError as e:
                if isinstance(e.os_error, BlockedAddress) or isinstance(e.__cause__, BlockedAddress):
                    raise FetchFailed("blocked address") from e
                reason = "connection error"
            except TooLarge as e:
                raise FetchFailed("too large") from e
            except ValueError as e:
                raise FetchFailed(f"bad body: {e}") from e
            except FetchFailed as e:
                reason = e.reason
            except (asyncio.TimeoutError, TimeoutError):
                reason = "timeout"
            except aiohttp.ClientError as e:
                reason = f"client error: {type(e).__name__}"
            if attempt == cfg.retries:
                raise FetchFailed(reason)
            wait = cfg.backoff * 2 ** attempt
            if retry_after and re.fullmatch(r"[0-9]{1,9}", retry_after.strip()):   # ASCII only: "²".isdigit() is True
                wait = max(wait, min(float(retry_after), cfg.timeout))
            await asyncio.sleep(wait)

    async def follow(self, url, allowed_types, max_body=None, check_robots=True):
        """Follow redirects (each hop scope-, robots- and SSRF-checked); -> final Hop."""
        chain = [url]
        while True:
            if check_robots and not await self.robots_allow(url):
                raise FetchFailed("robots")
            hop = await self.request(url, allowed_types, max_body)
            if hop.location is None:
                return hop
            target = normalize_url(hop.location, url)
            if target is None:
                raise FetchFailed("bad redirect")
            if target in chain:
                raise FetchFailed("redirect loop")
            if len(chain) > self.cfg.max_redirects:
                raise FetchFailed("too many redirects")
            if not (self.wanted(target) if check_robots else self.in_scope(target)):   # robots.txt too stays in scope
                raise FetchFailed("offsite redirect")
            chain.append(target)
            url = target

    async def robots_allow(self, url):
        if not self.cfg.obey_robots:
            return True
        origin = origin_of(url)
        if origin not in self.robots:
            async with self.robots_locks.setdefault(origin, asyncio.Lock()):
                if origin not in self.robots:
                    self.robots[origin] = await self.fetch_robots(origin)
        parser = self.robots[origin]
        return parser.can_fetch(self.cfg.user_agent, url)

    async def fetch_robots(self, origin):
        parser = urllib.robotparser.RobotFileParser()
        try:
            # RFC 9309: parse at least 500 KiB; 4xx -> no rules; 5xx / unreachable -> disallow all.
            hop = await self.follow(origin + "/robots.txt", None, max_body=512 * 1024, check_robots=False)
            if hop.status == 200:
                parser.parse(_robots_lines(decode_text(hop.body or b"", hop.content_type)))
            elif 400 <= hop.status < 500:
                parser.parse([])
            else:
                parser.disallow_all = True
        except FetchFailed as e:
            if e.reason == "blocked address":
                raise  # the host itself is refused: say so rather than blaming robots.txt
            parser.disallow_all = True
        delay = parser.crawl_delay(self.cfg.user_agent)
        if delay:
            self.crawl_delay[urlsplit(origin).netloc] = min(float(delay), self.cfg.max_crawl_delay)
        return parser

    async def fetch_page(self, url, depth):
        """-> dict(state, status, reason, final_url, record, links, sitemap)."""
        is_sitemap = url in self.seeds and urlsplit(url).path.endswith(".xml")
        types = None if is_sitemap else set(self.cfg.content_types)
        try:
            hop = await self.follow(url, types)
        except FetchFailed as e:
            state = "skipped" if e.reason in ("robots", "offsite redirect") else "failed"
            return {"state": state, "status": e.status, "reason": e.reason}
        if hop.status != 200:
            return {"state": "failed", "status": hop.status, "reason": f"http {hop.status}"}
        if hop.body is None:
            return {"state": "skipped", "status": hop.status, "reason": "content-type",
                    "final_url": hop.url}
        nbytes = len(hop.body)
        if is_sitemap or b"<urlset" in hop.body[:2048] or b"<sitemapindex" in hop.body[:2048]:
            links = [u for u in (normalize_url(x) for x in sitemap_locs(hop.body)) if u and self.wanted(u)]
            links = links[:self.cfg.max_links_per_page]
            return {"state": "done", "status": 200, "reason": "sitemap", "links": links, "sitemap": True,
                    "final_url": hop.url, "bytes": nbytes}
        text = decode_text(hop.body, hop.content_type)
        mime = hop.content_type.split(";", 1)[0].strip().lower()
        if mime == "text/plain":
            title, links, noindex = "", [], False
        else:
            # selectolax parses synchronously; pages are capped at max_decoded_bytes, so this is short.
            title, text, links, noindex, _ = extract_html(text, hop.url)
        links = [u for u in dict.fromkeys(links) if self.wanted(u)][:self.cfg.max_links_per_page]
        record = None if noindex else {"url": hop.url, "title": title, "text": text,
                                       "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                       "status": hop.status, "depth": depth, "bytes": nbytes}
        return {"state": "done", "status": 200, "reason": "noindex" if noindex else None, "final_url": hop.url,
                "record": record, "links": links, "bytes": nbytes}

    def process_result(self, url, depth, res, bar):
        """Commit one outcome. Synchronous: no other task runs between the shard write and the
        SQLite commit, so the committed position always matches the records before it."""
        record, final_url = res.get("record"), res.get("final_url")
        reason = res.get("reason")
        position = None
        if record is not None:
            if final_url != url and self.frontier.is_stored(final_url):
                record, reason = None, "duplicate (redirect target)"
            elif self.stored >= self.cfg.max_pages:
                return  # over budget: leave the URL queued for a larger rerun
        if record is not None:
            self.writer.write(record)
            position = self.writer.sync()
            self.stored += 1
            bar.update(1)
        self.bytes += res.get("bytes", 0)
        link_depth = depth if res.get("sitemap") else depth + 1
        links = res.get("links") if link_depth <= self.cfg.max_depth else []
        self.frontier.commit(url, res["state"], res.get("status"), reason, links, link_depth, final_url,
                             stored=record is not None, nbytes=res.get("bytes", 0), position=position)

    async def run(self):
        cfg = self.cfg
        self.frontier.add([s for s in self.seeds if self.wanted(s)], 0)
        connector = aiohttp.TCPConnector(resolver=GuardedResolver(cfg.allow_private, self.trusted),
                                         limit=cfg.concurrency, limit_per_host=cfg.per_host_concurrency)
        timeout = aiohttp.ClientTimeout(total=cfg.timeout, sock_connect=cfg.timeout, sock_read=cfg.timeout)
        headers = {"User-Agent": cfg.user_agent, "Accept-Encoding": "gzip, deflate"}
        # auto_decompress off: read_body decompresses with a cap; no cookies: a crawler is stateless.
        async with aiohttp.ClientSession(connector=connector, timeout=timeout, headers=headers, auto_decompress=False,
                                         cookie_jar=aiohttp.DummyCookieJar()) as self.session:
            cond = asyncio.Condition()
            with tqdm(total=cfg.max_pages, initial=min(self.stored, cfg.max_pages), desc="crawl", unit="page",
                      disable=None) as bar:
                await asyncio.gather(*(self.worker(cond, bar) for _ in range(cfg.concurrency)))
        self.writer.close()
        counts = self.frontier.counts()
        self.frontier.close()
        return counts


# --- the pydoc default ----------------------------------------------------------------------------

_PYDOC_SERVER = r"""
import os, sys, time, pydoc
t = pydoc._start_server(pydoc._url_handler, hostname="127.0.0.1", port=int(sys.argv[1]))
while not t.serving and t.error is None:
    time.sleep(0.01)
print(t.url if t.error is None else "ERROR " + str(t.error), flush=True)
if t.error is not None:
    sys.exit(1)
null = os.open(os.devnull, os.O_WRONLY)   # module imports may print; nobody reads our stdout now
os.dup2(null, 1); os.dup2(null, 2)
sys.stdin.read()                          # serve until the parent closes stdin (or dies)
t.stop()
"""

# Pages whose rendering imports a module with side effects (opening a browser, printing, GUI
# toolkits) or that only repeat what the scrape step collects (module source via getfile).
PYDOC_EXCLUDE = [r"/(antigravity|this|__hello__|__phello__|idlelib|tkinter|turtle|turtledemo|test|ensurepip|venv"
                 r"|lib2to3|pydoc_data|__main__)([.][\w.]*)?\.html$", r"/(getfile|search|get)\?"]


@contextlib.contextmanager
def pydoc_server(port=0):
    """Python's pydoc documentation server on 127.0.0.1 in a child process; yields its base URL.
    -I -S: isolated, without site-packages, so it documents exactly the standard library."""
    env = dict(os.environ, BROWSER="true", DISPLAY="", PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _PYDOC_SERVER, str(port)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True)
    try:
        line = proc.stdout.readline().strip()
        if not line.startswith("http://"):
            raise RuntimeError(f"pydoc server did not start: {line or 'no output'}")
        yield line
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_step(run_dir, cfg):
    c = from_dict(CrawlConfig, cfg, "crawl")
    out = RunDir.of(run_dir).output("crawl")
    t0 = time.time()
    if c.seeds == "pydoc" or c.seeds == ["pydoc"]:
        # Reuse the previous run's port when free so queued URLs stay valid; else rewrite them.
        state_path = out / "pydoc.json"
        previous = json.loads(state_path.read_text())["url"] if state_path.exists() else None
        try:
            ctx = pydoc_server(urlsplit(previous).port if previous else 0)
            url = ctx.__enter__()
        except RuntimeError:
            ctx = pydoc_server(0)
            url = ctx.__enter__()
        try:
            if previous and previous != url:
                f = Frontier(out / "frontier.sqlite")
                f.rewrite_origin(previous.rstrip("/"), url.rstrip("/"))
                f.close()
            atomic_write_json(state_path, {"url": url})
            host = urlsplit(url).hostname
            # Topics and keywords first: their pages are prose, the module index is mostly API listings.
            seeds = [normalize_url(url + p) for p in ("topics.html", "keywords.html", "")]
            counts = asyncio.run(Crawler(c, out, seeds, [host], c.allow_private_hosts + [host],
                                         c.exclude + PYDOC_EXCLUDE).run())
        finally:
            ctx.__exit__(None, None, None)
    else:
        seeds = [normalize_url(s) for s in ([c.seeds] if isinstance(c.seeds, str) else c.seeds)]
        scope = c.allowed_domains or sorted({urlsplit(s).hostname for s in seeds})
        counts = asyncio.run(Crawler(c, out, seeds, scope, c.allow_private_hosts, c.exclude).run())
    stats = {"pages": counts["pages"], "bytes": counts["bytes"], "urls": counts["urls"], "reasons": counts["reasons"],
             "shards": len(shard_paths(out, "pages")), "seconds": round(time.time() - t0, 2),
             "max_pages": c.max_pages, "max_depth": c.max_depth}
    atomic_write_json(out / "stats.json", stats)
    return stats


STEP = Step(name="crawl", config=CrawlConfig, run=run_step, check=validate_config)
