"""Tools a model can call: a registry with JSON-schema arguments, the tool-call format of the chat
template, argument validation, and an HTTP API connector with an allow-list, timeouts and size caps.

Tool-call format: the chat template's (quark.chat: the syntax `quark serve` parses into OpenAI tool_calls
and SFT trains on), inside an assistant message:
    assistant: <tool_call>{"name": "weather", "arguments": {"city": "Oslo"}}</tool_call>
(a bare {"tool": NAME, "arguments": {...}} object, the earlier format, is still read), and the
observation comes back as a `tool` message:
    tool:      {"tool": "weather", "result": {...}}      or      {"tool": "weather", "error": "..."}
Arguments are checked against the tool's JSON schema (Draft 2020-12, the `jsonschema` package) before
the tool runs, so a tool body never sees malformed input; every failure becomes an error observation
the model can read, never an exception in the agent loop.
"""
import ast
import http.client
import json
import operator
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass, field

import jsonschema

from quark.chat import format_tool_call, parse_tool_calls, tools_prompt


class ToolError(Exception):
    pass


@dataclass
class ToolCall:
    tool: str
    arguments: dict

    def to_text(self):
        return format_tool_call(self.tool, self.arguments)


@dataclass
class ToolResult:
    tool: str
    ok: bool
    value: object = None
    error: str = None
    seconds: float = 0.0

    def to_message(self, max_chars=4000):
        body = {"tool": self.tool, "result": self.value} if self.ok else {"tool": self.tool, "error": self.error}
        text = json.dumps(body, default=str)
        if len(text) > max_chars:   # long observations would crowd the context window
            text = text[: max_chars - 15] + "...(truncated)"
        return {"role": "tool", "content": text}


def parse_tool_call(text):
    """The (first) tool call in an assistant message -> ToolCall, or None when the message is a plain
    answer: a <tool_call> block, else a JSON object with "tool" (string) and "arguments" anywhere in the text."""
    calls = parse_tool_calls(text)[1]
    if calls:
        return ToolCall(*calls[0])
    decoder = json.JSONDecoder()
    i = text.find("{")
    while i != -1:
        try:
            obj, _ = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            obj = None
        if isinstance(obj, dict) and isinstance(obj.get("tool"), str):
            return ToolCall(obj["tool"], obj.get("arguments", {}))
        i = text.find("{", i + 1)
    return None


@dataclass
class Tool:
    name: str
    description: str
    parameters: dict                   # JSON schema of the arguments object
    fn: object                         # fn(**arguments) -> JSON-able value
    tags: list = field(default_factory=list)

    def spec(self):
        return {"name": self.name, "description": self.description, "parameters": self.parameters}


class ToolRegistry:
    def __init__(self):
        self.tools = {}

    def register(self, name, description, parameters, fn, tags=()):
        if not name or not name.replace("_", "").replace(".", "").isalnum():
            raise ValueError(f"tool name {name!r}: use letters, digits, '_' and '.'")
        if name in self.tools:
            raise ValueError(f"tool {name!r} is already registered")
        if parameters.get("type") != "object":
            raise ValueError(f"tool {name!r}: the parameters schema must describe an object (type: object)")
        try:
            jsonschema.Draft202012Validator.check_schema(parameters)
        except jsonschema.SchemaError as e:
            raise ValueError(f"tool {name!r}: invalid JSON schema: {e.message}") from None
        self.tools[name] = Tool(name, description, parameters, fn, list(tags))
        return self.tools[name]

    def tool(self, name, description, parameters, tags=()):
        """Decorator form of register."""
        def wrap(fn):
            self.register(name, description, parameters, fn, tags)
            return fn
        return wrap

    def __contains__(self, name):
        return name in self.tools

    def specs(self, names=None):
        return [t.spec() for n, t in self.tools.items() if names is None or n in names]

    def openai_tools(self, names=None):
        """The tools as OpenAI tool objects (what chat requests and instruction records carry)."""
        return [{"type": "function", "function": s} for s in self.specs(names)]

    def system_prompt(self, names=None):
        """Tool descriptions and the call format, for the system message: the chat template's own text
        (quark.chat.tools_prompt), so the run's model sees its tools as its tool-use training showed them."""
        return tools_prompt(self.openai_tools(names))

    def validate(self, call):
        if call.tool not in self.tools:
            raise ToolError(f"unknown tool {call.tool!r}; available: {', '.join(sorted(self.tools)) or 'none'}")
        if not isinstance(call.arguments, dict):
            raise ToolError(f"arguments for {call.tool!r} must be a JSON object, got {type(call.arguments).__name__}")
        schema = self.tools[call.tool].parameters
        errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(call.arguments), key=lambda e: list(e.path))
        if errors:
            e = errors[0]
            where = "/".join(str(p) for p in e.path) or "arguments"
            raise ToolError(f"invalid arguments for {call.tool!r} at {where}: {e.message}")

    def call(self, call):
        """Validate and run -> ToolResult (errors are results, not exceptions)."""
        t0 = time.perf_counter()
        try:
            self.validate(call)
            value = self.tools[call.tool].fn(**call.arguments)
            json.dumps(value, default=str)
            return ToolResult(call.tool, True, value, seconds=time.perf_counter() - t0)
        except ToolError as e:
            return ToolResult(call.tool, False, error=str(e), seconds=time.perf_counter() - t0)
        except Exception as e:   # a failing tool is an observation for the model, not a crash of the agent
            return ToolResult(call.tool, False, error=f"{type(e).__name__}: {e}", seconds=time.perf_counter() - t0)


# ------------------------------------------------------------------------------ built-in tools
# The tools the run's own model is fine-tuned to call (quark.tune.instruct writes records with exactly
# this registry's listing) and the agent offers: a calculator (exact arithmetic, which a small model
# cannot do itself; Schick et al. 2023, "Toolformer") and a search over the run's document index.
_ARITH = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
          ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}


def calculate(expression):
    """Exact arithmetic on numbers with + - * / // % ** and parentheses (parsed, never evaluated as code)."""
    if not isinstance(expression, str) or len(expression) > 200:
        raise ToolError("expression must be a string of at most 200 characters")

    def ev(node):
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = ev(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.BinOp) and type(node.op) in _ARITH:
            a, b = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and (abs(b) > 64 or abs(a) > 1e6):   # bounded: no 9**9**9
                raise ToolError("exponent too large")
            try:
                return _ARITH[type(node.op)](a, b)
            except ZeroDivisionError:
                raise ToolError("division by zero") from None
        raise ToolError(f"not arithmetic: {ast.unparse(node)!r}")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise ToolError(f"not an arithmetic expression: {expression!r}") from None
    return ev(tree.body)


# short specs: every tool-use example carries the listing, and a small model's context is short
CALCULATOR = ("calculator", "Exact arithmetic.",
              {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]})
SEARCH_DOCS = ("search_docs", "Search the documentation by topic.",
               {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]})


def builtin_tools(search=None):
    """A registry with the calculator and, given search(query) -> [{"doc", "text"}], search_docs."""
    reg = ToolRegistry()
    reg.register(*CALCULATOR, calculate)
    reg.register(*SEARCH_DOCS, search or (lambda query: []))
    return reg


def store_search(store, k=1, max_chars=400):
    """search_docs over a retrieval Store: the top k passages with their document ids (one by default: the
    tool-use records show one, and a small model's context is short)."""
    return lambda query: [{"doc": h.doc_id, "text": h.text[:max_chars]} for h in store.search(query, k=k)]


# ------------------------------------------------------------------------------ HTTP connector
DEFAULT_PORTS = {"http": 80, "https": 443}


def _origin(url):
    """(scheme, host, port) of an http(s) URL, the port made explicit."""
    p = urllib.parse.urlsplit(url)
    return p.scheme, (p.hostname or "").lower(), p.port or DEFAULT_PORTS.get(p.scheme)


def _allow_entry(entry):
    """An allow-list entry -> (schemes, host, port): "https://host[:port]" names one origin;
    "host:port" both schemes on that port; a bare "host" only the default ports (80, 443)."""
    if "://" in entry:
        scheme, host, port = _origin(entry)
        if scheme not in DEFAULT_PORTS or not host:
            raise ValueError(f"allow_hosts entry {entry!r}: expected scheme://host[:port] with http or https")
        return (scheme,), host, port
    p = urllib.parse.urlsplit("//" + entry)
    if not p.hostname:
        raise ValueError(f"allow_hosts entry {entry!r}: expected host, host:port or scheme://host[:port]")
    return ("http", "https"), p.hostname.lower(), p.port


class AllowList:
    """The origins a client may reach, matched on scheme, host and port: "scheme://host[:port]" names
    one origin; "host:port" both schemes on that port; a bare "host" only the default ports (80, 443)."""

    def __init__(self, entries):
        self.entries = [_allow_entry(e) for e in entries]

    def match(self, url):
        """-> the entry (schemes, host, port) that admits url, or None."""
        try:
            scheme, host, port = _origin(url)
        except ValueError:   # a port out of range
            return None
        for schemes, h, p in self.entries:
            if scheme in schemes and host == h and port == (p or DEFAULT_PORTS[scheme]):
                return schemes, h, p
        return None


class HTTPAPI:
    """Call an HTTP JSON API as a tool. `path` may hold {placeholders} filled from the arguments
    (percent-encoded, "/" and "." included, so a value stays one path segment); the other arguments
    go to the query string (GET) or a JSON body (POST/PUT).

    Only origins in allow_hosts are reached, including across redirects: "scheme://host[:port]",
    "host:port", or "host" (default ports only); default: the origin of base_url. `headers`
    (credentials such as Authorization) go only to base_url's origin, and over plain http only when
    an allow entry names http explicitly. The whole call (connect, headers, every body read) has one
    deadline, enforced by shutting the socket down when it passes, and the body a size cap."""

    def __init__(self, base_url, path="", method="GET", allow_hosts=None, timeout=5.0, max_bytes=1 << 20,
                 headers=None, max_redirects=3):
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
            raise ValueError(f"base_url must be an http(s) URL with a host, got {base_url!r}")
        self.base_url, self.path, self.method = base_url.rstrip("/"), path, method.upper()
        self.allow = AllowList(allow_hosts if allow_hosts is not None else [base_url])
        self.timeout, self.max_bytes, self.max_redirects = timeout, max_bytes, max_redirects
        self.headers = dict(headers or {})

    def url_for(self, arguments):
        args = dict(arguments)
        path = self.path
        for key in list(args):
            token = "{" + key + "}"
            if token in path:
                value = str(args.pop(key))
                if value in ("", ".", ".."):   # even encoded, WHATWG parsers read %2e%2e as ".."
                    raise ToolError(f"path parameter {key!r} may not be empty, '.' or '..'")
                path = path.replace(token, urllib.parse.quote(value, safe="").replace(".", "%2E"))
        url = self.base_url + path
        if self.method == "GET" and args:
            url += ("&" if "?" in url else "?") + urllib.parse.urlencode(args, doseq=True)
        return url, (args if self.method != "GET" else None)

    def __call__(self, **arguments):
        url, body = self.url_for(arguments)
        data = json.dumps(body).encode() if body is not None else None
        base = _origin(self.base_url)
        deadline = time.monotonic() + self.timeout
        for _ in range(self.max_redirects + 1):
            entry = self.allow.match(url)
            if entry is None:
                raise ToolError(f"origin of {url!r} is not in the allow-list")
            headers = {"Accept": "application/json"}
            if _origin(url) == base and (base[0] == "https" or entry[0] == ("http",)):
                headers.update(self.headers)
            if data is not None:
                headers["Content-Type"] = "application/json"
            status, resp_headers, payload = self._request(url, data, headers, deadline)
            if status in (301, 302, 303, 307, 308) and resp_headers.get("Location"):
                url = urllib.parse.urljoin(url, resp_headers["Location"])
                continue
            if status >= 400:
                detail = payload[:512].decode("utf-8", "replace")
                raise ToolError(f"HTTP {status} from {url}: {detail}")
            text = payload.decode(resp_headers.get_content_charset() or "utf-8", "replace")
            if "json" in (resp_headers.get_content_type() or ""):
                try:
                    return json.loads(text)
                except json.JSONDecodeError:
                    raise ToolError(f"{url} said JSON but sent invalid JSON") from None
            return text
        raise ToolError(f"too many redirects (> {self.max_redirects}) from {self.base_url}")

    def _request(self, url, data, headers, deadline):
        """One request -> (status, headers, body bytes). A timer shuts the socket down at the
        deadline: a server that sends one byte at a time resets every per-read socket timeout,
        so only a wall-clock cut bounds the headers and the body."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ToolError(f"timed out after {self.timeout}s calling {url}")
        p = urllib.parse.urlsplit(url)
        cls = http.client.HTTPSConnection if p.scheme == "https" else http.client.HTTPConnection
        conn = cls(p.hostname, p.port, timeout=remaining)
        timer = threading.Timer(remaining, _shutdown, (conn,))
        timer.start()
        try:
            conn.connect()
            if time.monotonic() >= deadline:   # the timer fired while connecting, before conn.sock existed
                raise TimeoutError
            conn.request(self.method, urllib.parse.urlunsplit(("", "", p.path or "/", p.query, "")), body=data,
                         headers=headers)
            resp = conn.getresponse()
            length = resp.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > self.max_bytes:
                raise ToolError(f"response from {url} is {length} bytes, over the cap of {self.max_bytes}")
            buf = bytearray()
            while piece := resp.read1(min(65536, self.max_bytes + 1 - len(buf))):
                buf += piece
                if len(buf) > self.max_bytes:
                    raise ToolError(f"response from {url} exceeds the cap of {self.max_bytes} bytes")
            if time.monotonic() >= deadline:   # the cut looks like an early end of the body
                raise TimeoutError
            if resp.length:   # the server closed before Content-Length bytes
                raise http.client.IncompleteRead(bytes(buf), resp.length)
            return resp.status, resp.headers, bytes(buf)
        except (OSError, http.client.HTTPException) as e:
            if time.monotonic() >= deadline:
                raise ToolError(f"timed out after {self.timeout}s calling {url}") from None
            raise ToolError(f"request to {url} failed: {e}") from None
        finally:
            timer.cancel()
            conn.close()


def _shutdown(conn):
    sock = conn.sock
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def register_http_api(registry, name, description, parameters, base_url, **kw):
    """Register an HTTPAPI connector as a tool -> the Tool."""
    return registry.register(name, description, parameters, HTTPAPI(base_url, **kw), tags=["http"])
