import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest

from quark.chat import render
from quark.retrieval.tools import (HTTPAPI, ToolCall, ToolError, ToolRegistry, builtin_tools, parse_tool_call,
                                   register_http_api)

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "minLength": 1},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city"], "additionalProperties": False}


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def handle(self):
        try:
            super().handle()
        except (BrokenPipeError, ConnectionResetError):   # the client gave up (timeout/size-cap tests)
            pass

    def _json(self, obj, code=200):
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        u = urlsplit(self.path)
        q = {k: v[0] for k, v in parse_qs(u.query).items()}
        if u.path == "/weather":
            self._json({"city": q["city"], "days": int(q.get("days", 1)), "forecast": "rain"})
        elif u.path.startswith("/users/"):
            self._json({"user": u.path.split("/", 2)[2]})
        elif u.path == "/big":
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()   # no Content-Length: the cap must hold while streaming
            for _ in range(64):
                self.wfile.write(b"x" * 1024)
        elif u.path == "/slow":
            time.sleep(1.5)
            self._json({"late": True})
        elif u.path == "/hop":
            self.send_response(302)
            self.send_header("Location", "/weather?city=Hop")
            self.end_headers()
        elif u.path == "/escape":
            self.send_response(302)
            self.send_header("Location", self.server.elsewhere + "/weather?city=Evil")
            self.end_headers()
        elif u.path == "/auth":   # what a credential-stealing endpoint would see
            self._json({"auth": self.headers.get("Authorization"), "key": self.headers.get("X-Api-Key")})
        elif u.path == "/auth-elsewhere":
            self.send_response(307)
            self.send_header("Location", self.server.elsewhere + "/auth")
            self.end_headers()
        else:
            self._json({"error": "not found"}, 404)

    def do_POST(self):
        n = int(self.headers["Content-Length"])
        self._json({"echo": json.loads(self.rfile.read(n))})


@pytest.fixture(scope="module")
def servers():
    """Two servers on 127.0.0.1 -> their base URLs; the first one's redirects lead to the second."""
    servers = [ThreadingHTTPServer(("127.0.0.1", 0), Handler) for _ in range(2)]
    for s in servers:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    servers[0].elsewhere = f"http://127.0.0.1:{servers[1].server_address[1]}"
    yield [f"http://127.0.0.1:{s.server_address[1]}" for s in servers]
    for s in servers:
        s.shutdown()
        s.server_close()


@pytest.fixture(scope="module")
def server(servers):
    return servers[0]


def test_tool_call_format_roundtrip_and_parse():
    call = ToolCall("weather", {"city": "Oslo"})
    assert parse_tool_call(call.to_text()) == call
    assert parse_tool_call('Let me check. {"tool": "weather", "arguments": {"city": "Bergen"}} ok') == \
        ToolCall("weather", {"city": "Bergen"})
    assert parse_tool_call("The answer is {42} and {not json") is None
    assert parse_tool_call('{"answer": 1}') is None
    text = render([{"role": "user", "content": "weather?"}, {"role": "assistant", "content": call.to_text()},
                   {"role": "tool", "content": '{"tool": "weather", "result": "rain"}'}])
    assert '<|assistant|><tool_call>{"name": "weather"' in text and "<|tool|>" in text
    assert parse_tool_call(call.to_text() + ' <tool_call>{"name": "x", "arguments": {}}</tool_call>') == call   # the first


def test_registry_validates_arguments():
    reg = ToolRegistry()

    @reg.tool("add", "add two integers", {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                                          "required": ["a", "b"]})
    def add(a, b):
        return a + b

    assert reg.call(ToolCall("add", {"a": 2, "b": 3})).value == 5
    bad = reg.call(ToolCall("add", {"a": 2, "b": "3"}))
    assert not bad.ok and "at b" in bad.error and "integer" in bad.error
    assert "'b' is a required property" in reg.call(ToolCall("add", {"a": 1})).error
    assert "must be a JSON object" in reg.call(ToolCall("add", [1, 2])).error
    assert "unknown tool 'mul'" in reg.call(ToolCall("mul", {})).error
    reg.register("boom", "fails", {"type": "object"}, lambda: 1 / 0)
    assert reg.call(ToolCall("boom", {})).error.startswith("ZeroDivisionError")
    msg = reg.call(ToolCall("add", {"a": 1, "b": 1})).to_message()
    assert msg == {"role": "tool", "content": '{"tool": "add", "result": 2}'}
    assert '"name": "add"' in reg.system_prompt() and '<tool_call>{"name": NAME' in reg.system_prompt()
    with pytest.raises(ValueError, match="invalid JSON schema"):
        reg.register("x", "bad", {"type": "object", "properties": {"a": {"type": "nonsense"}}}, print)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("add", "dup", {"type": "object"}, print)


def test_http_connector_against_a_local_server(server):
    reg = ToolRegistry()
    register_http_api(reg, "weather", "forecast for a city", WEATHER, server, path="/weather")
    ok = reg.call(ToolCall("weather", {"city": "Oslo", "days": 3}))
    assert ok.ok and ok.value == {"city": "Oslo", "days": 3, "forecast": "rain"}
    assert "maximum" in reg.call(ToolCall("weather", {"city": "Oslo", "days": 9})).error   # never sent
    assert "Additional properties" in reg.call(ToolCall("weather", {"city": "x", "evil": 1})).error
    user = HTTPAPI(server, path="/users/{name}")
    assert user(name="a/../b c") == {"user": "a%2F%2E%2E%2Fb%20c"}  # placeholders are quoted, no path escape
    assert HTTPAPI(server, path="/echo", method="POST")(x=[1, 2]) == {"echo": {"x": [1, 2]}}
    assert HTTPAPI(server, path="/hop")() == {"city": "Hop", "days": 1, "forecast": "rain"}


def test_http_connector_limits(server):
    with pytest.raises(ToolError, match="not in the allow-list"):
        HTTPAPI(server, path="/escape")()                             # redirect to another port
    with pytest.raises(ToolError, match="not in the allow-list"):
        HTTPAPI(server, allow_hosts=["example.org"])()
    with pytest.raises(ToolError, match="exceeds the cap"):
        HTTPAPI(server, path="/big", max_bytes=10_000)()
    assert len(HTTPAPI(server, path="/big", max_bytes=1 << 20)()) == 65536
    t0 = time.monotonic()
    with pytest.raises(ToolError, match="timed out|failed"):
        HTTPAPI(server, path="/slow", timeout=0.3)()
    assert time.monotonic() - t0 < 1.2
    with pytest.raises(ToolError, match="HTTP 404"):
        HTTPAPI(server, path="/missing")()
    with pytest.raises(ValueError, match="http"):
        HTTPAPI("file:///etc/passwd")


def drip_server(header_drip):
    """A raw TCP server that sends its response one byte every 0.3 s (the headers too when
    header_drip), for 6 s: each byte resets a per-read socket timeout. -> (url, stop)."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)
                head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 20\r\n\r\n"
                body = b'{"x": "' + b"y" * 11 + b'"}'
                if not header_drip:
                    conn.sendall(head)
                try:
                    for byte in (head if header_drip else b"") + body:
                        conn.sendall(bytes([byte]))
                        time.sleep(0.3)
                except OSError:
                    pass   # the client hung up

    threading.Thread(target=serve, daemon=True).start()

    def close():
        stop.set()
        listener.close()
    return f"http://127.0.0.1:{listener.getsockname()[1]}", close


@pytest.mark.parametrize("header_drip", [False, True])
def test_http_connector_deadline_holds_against_a_dripping_server(header_drip):
    url, close = drip_server(header_drip)
    try:
        t0 = time.monotonic()
        with pytest.raises(ToolError, match="timed out after 0.5s"):
            HTTPAPI(url, timeout=0.5)()
        assert time.monotonic() - t0 < 1.5
    finally:
        close()


def test_http_connector_keeps_credentials_at_home(servers):
    a, b = servers
    secret = {"Authorization": "Bearer s3cret", "X-Api-Key": "k3y"}
    # The base origin (http, named by the default allow entry) gets them.
    assert HTTPAPI(a, path="/auth", headers=secret)() == {"auth": "Bearer s3cret", "key": "k3y"}
    # A redirect to another allowed origin does not.
    assert HTTPAPI(a, path="/auth-elsewhere", allow_hosts=[a, b], headers=secret)() == {"auth": None, "key": None}
    # Plain http without an entry that says http: not sent.
    port = a.rsplit(":", 1)[1]
    assert HTTPAPI(a, path="/auth", allow_hosts=[f"127.0.0.1:{port}"], headers=secret)() == {"auth": None, "key": None}
    assert HTTPAPI(a, path="/auth", allow_hosts=[a], headers=secret)()["auth"] == "Bearer s3cret"


def test_http_connector_allow_entries_match_scheme_host_and_port(servers):
    a, b = servers
    port = a.rsplit(":", 1)[1]
    with pytest.raises(ToolError, match="not in the allow-list"):
        HTTPAPI(a, path="/weather", allow_hosts=["127.0.0.1"])(city="x")        # host only: default ports only
    with pytest.raises(ToolError, match="not in the allow-list"):
        HTTPAPI(a, path="/weather", allow_hosts=[f"https://127.0.0.1:{port}"])(city="x")   # wrong scheme
    with pytest.raises(ToolError, match="not in the allow-list"):
        HTTPAPI(a, path="/escape", allow_hosts=[f"127.0.0.1:{port}"])()          # redirect to another port
    assert HTTPAPI(a, path="/weather", allow_hosts=[f"127.0.0.1:{port}"])(city="x")["city"] == "x"
    assert HTTPAPI(a, path="/escape", allow_hosts=[a, b])()["city"] == "Evil"
    with pytest.raises(ValueError, match="allow_hosts entry"):
        HTTPAPI(a, allow_hosts=["ftp://127.0.0.1"])


def test_http_connector_path_parameters_stay_one_segment(server):
    user = HTTPAPI(server, path="/users/{name}")
    assert user(name="../../admin") == {"user": "%2E%2E%2F%2E%2E%2Fadmin"}
    for bad in ("..", ".", ""):
        with pytest.raises(ToolError, match="may not be"):
            user(name=bad)


def test_builtin_calculator_is_exact_and_runs_no_code():
    reg = builtin_tools()
    assert [t["function"]["name"] for t in reg.openai_tools()] == ["calculator", "search_docs"]
    assert reg.call(ToolCall("calculator", {"expression": "874*63 - (10 // 3) + 2**10"})).value == 874 * 63 - 3 + 1024
    for bad, why in (("__import__('os').system('id')", "not arithmetic"), ("9**9**9", "exponent too large"),
                     ("1/0", "division by zero"), ("2 +", "not an arithmetic expression")):
        r = reg.call(ToolCall("calculator", {"expression": bad}))
        assert not r.ok and why in r.error, (bad, r.error)
    assert not reg.call(ToolCall("calculator", {"expr": "1+1"})).ok            # the schema names the argument
    assert reg.call(ToolCall("search_docs", {"query": "x"})).value == []       # no index: no passages
