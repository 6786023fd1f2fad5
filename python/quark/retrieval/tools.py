"""Tools a model can call: a registry with JSON-schema arguments, the tool-call format of the chat
template, argument validation, and an HTTP API connector with an allow-list, timeouts and size caps.

Tool-call format (inside an assistant message; the chat template has no tool-call token of its own):
    assistant: {"tool": "weather", "arguments": {"city": "Oslo"}}
and the observation comes back as a `tool` message:
    tool:      {"tool": "weather", "result": {...}}      or      {"tool": "weather", "error": "..."}
Arguments are checked against the tool's JSON schema (Draft 2020-12, the `jsonschema` package) before
the tool runs, so a tool body never sees malformed input; every failure becomes an error observation
the model can read, never an exception in the agent loop.
"""
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field

import jsonschema


class ToolError(Exception):
    pass


@dataclass
class ToolCall:
    tool: str
    arguments: dict

    def to_text(self):
        return json.dumps({"tool": self.tool, "arguments": self.arguments})


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
    """The tool call in an assistant message -> ToolCall, or None when the message is a plain answer.
    A JSON object with "tool" (string) and "arguments" (object) anywhere in the text counts."""
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

    def system_prompt(self, names=None):
        """Tool descriptions and the call format, for the system message."""
        lines = ["You can call tools. To call one, reply with only a JSON object "
                 '{"tool": NAME, "arguments": {...}}; the result comes back in a tool message.', "Tools:"]
        lines += [json.dumps(s) for s in self.specs(names)]
        return "\n".join(lines)

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


# ------------------------------------------------------------------------------ HTTP connector
class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None   # redirects are followed by HTTPAPI itself, re-checking the allow-list each hop


class HTTPAPI:
    """Call an HTTP JSON API as a tool. `path` may hold {placeholders} filled from the arguments
    (URL-quoted); the other arguments go to the query string (GET) or a JSON body (POST/PUT).
    Only hosts in allow_hosts ("host" or "host:port") are reached, including across redirects;
    every request has a timeout and the response body a size cap."""

    def __init__(self, base_url, path="", method="GET", allow_hosts=None, timeout=5.0, max_bytes=1 << 20,
                 headers=None, max_redirects=3):
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"base_url must be an http(s) URL with a host, got {base_url!r}")
        self.base_url, self.path, self.method = base_url.rstrip("/"), path, method.upper()
        self.allow_hosts = set(allow_hosts if allow_hosts is not None else [parts.netloc])
        self.timeout, self.max_bytes, self.max_redirects = timeout, max_bytes, max_redirects
        self.headers = dict(headers or {})
        self.opener = urllib.request.build_opener(_NoRedirect)

    def _allowed(self, url):
        p = urllib.parse.urlsplit(url)
        return p.scheme in ("http", "https") and (p.netloc in self.allow_hosts or p.hostname in self.allow_hosts)

    def url_for(self, arguments):
        args = dict(arguments)
        path = self.path
        for key in list(args):
            token = "{" + key + "}"
            if token in path:
                path = path.replace(token, urllib.parse.quote(str(args.pop(key)), safe=""))
        url = self.base_url + path
        if self.method == "GET" and args:
            url += ("&" if "?" in url else "?") + urllib.parse.urlencode(args, doseq=True)
        return url, (args if self.method != "GET" else None)

    def __call__(self, **arguments):
        url, body = self.url_for(arguments)
        deadline = time.monotonic() + self.timeout
        for _ in range(self.max_redirects + 1):
            if not self._allowed(url):
                raise ToolError(f"host of {url!r} is not in the allow-list {sorted(self.allow_hosts)}")
            data = json.dumps(body).encode() if body is not None else None
            headers = {"Accept": "application/json", **self.headers}
            if data is not None:
                headers["Content-Type"] = "application/json"
            req = urllib.request.Request(url, data=data, method=self.method, headers=headers)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ToolError(f"timed out after {self.timeout}s calling {url}")
            try:
                resp = self.opener.open(req, timeout=remaining)
            except urllib.error.HTTPError as e:
                if e.code in (301, 302, 303, 307, 308) and e.headers.get("Location"):
                    url = urllib.parse.urljoin(url, e.headers["Location"])
                    e.close()
                    continue
                detail = e.read(512).decode("utf-8", "replace")
                e.close()
                raise ToolError(f"HTTP {e.code} from {url}: {detail}") from None
            except (urllib.error.URLError, TimeoutError, OSError) as e:
                reason = getattr(e, "reason", e)
                raise ToolError(f"request to {url} failed: {reason}") from None
            with resp:
                return self._read(resp, url, deadline)
        raise ToolError(f"too many redirects (> {self.max_redirects}) from {self.base_url}")

    def _read(self, resp, url, deadline):
        length = resp.headers.get("Content-Length")
        if length and length.isdigit() and int(length) > self.max_bytes:
            raise ToolError(f"response from {url} is {length} bytes, over the cap of {self.max_bytes}")
        buf = bytearray()
        while True:
            if time.monotonic() > deadline:
                raise ToolError(f"timed out after {self.timeout}s reading {url}")
            try:
                piece = resp.read(min(65536, self.max_bytes + 1 - len(buf)))
            except (TimeoutError, OSError) as e:
                raise ToolError(f"reading {url} failed: {e}") from None
            if not piece:
                break
            buf += piece
            if len(buf) > self.max_bytes:
                raise ToolError(f"response from {url} exceeds the cap of {self.max_bytes} bytes")
        text = buf.decode(resp.headers.get_content_charset() or "utf-8", "replace")
        if "json" in (resp.headers.get_content_type() or ""):
            try:
                return json.loads(text)
            except json.JSONDecodeError:
                raise ToolError(f"{url} said JSON but sent invalid JSON") from None
        return text


def register_http_api(registry, name, description, parameters, base_url, **kw):
    """Register an HTTPAPI connector as a tool -> the Tool."""
    return registry.register(name, description, parameters, HTTPAPI(base_url, **kw), tags=["http"])
