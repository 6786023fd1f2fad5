"""OpenAI-compatible HTTP server over the engine (FastAPI + uvicorn), the web UI, and `quark serve`.

Routes: GET /v1/models; POST /v1/completions and /v1/chat/completions (`stream: true` answers
server-sent events, `data: {chunk}` lines ending with `data: [DONE]`); POST /v1/feedback (a rating of
a response, stored in the run's feedback database, quark.feedback); GET /health; GET /metrics
(Prometheus text); GET / (chat page), /runs (training metrics page), /api/runs[/NAME].
Errors use OpenAI's body {"error": {"message", "type", "param", "code"}}: 400 bad input, 401 bad API
key, 404 unknown model or route, 413 body too large, 415 not JSON, 429 queue full, 503 shutting down.
uvicorn's graceful shutdown stops accepting connections and lets open requests (streams included)
finish before the engine drains and stops.

Hostile input: bodies are capped (max_body_bytes) and must be `application/json` (a cross-origin page
can POST text/plain without a preflight, never JSON); the Host header must name an allowed host
(default: the loopback names, so a DNS-rebound page cannot read a key-less local server); the API key,
when set, guards every route but /health and the static UI shell, which holds no data; prompts are
tokenized off the event loop (tokenizers' encode_batch releases the GIL), so one huge prompt never
stalls other streams; a non-streaming request is cancelled when its client disconnects; metric labels
are route templates, never raw paths.
"""
import asyncio
import contextlib
import json
import math
import secrets
import sys
import threading
import time
from pathlib import Path

from quark.chat import QuarkChat, chat_format, validate_messages
from quark.infer.engine import QueueFull, ShuttingDown
from quark.infer.sampling import SamplingParams

STATIC = Path(__file__).parent / "static"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
MAX_BODY_BYTES = 1 << 20
MAX_MESSAGES = 512
PUBLIC_ROUTES = ("/health", "/", "/runs", "/static/{name}")   # the UI shell loads before the user enters a key
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class APIError(Exception):
    def __init__(self, status, message, type_="invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self):
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class Metrics:
    """Counters, gauges and histograms rendered in the Prometheus text format (0.0.4)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.counters = {}      # (name, labels) -> value
        self.hists = {}         # name -> (bucket counts, sum, count)
        self.help = {}

    def inc(self, name, value=1, help_="", **labels):
        key = (name, tuple(sorted(labels.items())))
        with self.lock:
            self.counters[key] = self.counters.get(key, 0) + value
            self.help.setdefault(name, (help_, "counter"))

    def observe(self, name, value, help_=""):
        with self.lock:
            counts, total, n = self.hists.get(name, ([0] * len(LATENCY_BUCKETS), 0.0, 0))
            counts = [c + (value <= b) for c, b in zip(counts, LATENCY_BUCKETS)]
            self.hists[name] = (counts, total + value, n + 1)
            self.help.setdefault(name, (help_, "histogram"))

    def render(self, gauges):
        lines = []
        with self.lock:
            by_name = {}
            for (name, labels), v in sorted(self.counters.items()):
                by_name.setdefault(name, []).append((labels, v))
            for name, rows in by_name.items():
                lines += [f"# HELP {name} {self.help[name][0]}", f"# TYPE {name} counter"]
                for labels, v in rows:
                    lab = ",".join(f'{k}="{_escape_label(val)}"' for k, val in labels)
                    lines.append(f"{name}{{{lab}}} {v}" if lab else f"{name} {v}")
            for name, (counts, total, n) in sorted(self.hists.items()):
                lines += [f"# HELP {name} {self.help[name][0]}", f"# TYPE {name} histogram"]
                lines += [f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(LATENCY_BUCKETS, counts)]
                lines += [f'{name}_bucket{{le="+Inf"}} {n}', f"{name}_sum {total}", f"{name}_count {n}"]
        for name, (help_, v) in gauges.items():
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} gauge", f"{name} {v}"]
        return "\n".join(lines) + "\n"


def _escape_label(value):
    """Prometheus label value escaping: backslash, double quote and newline."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _host_name(header):
    """'example.com:8000' / '[::1]:8000' / '127.0.0.1' -> the host name, lower case, without port."""
    if header.startswith("["):
        return header[1:header.find("]")].lower() if "]" in header else ""
    return header.rsplit(":", 1)[0].lower() if header.count(":") == 1 else header.lower()


def _route(request):
    """The matched route's template ('/api/runs/{name}'), never the raw path: bounded metric labels."""
    route = request.scope.get("route")
    return getattr(route, "path", "unmatched")


def _encode(tokenizer, text):
    # encode_batch releases the GIL (encode does not), so other requests run while a long prompt encodes
    return tokenizer.encode_batch([text], add_special_tokens=False)[0].ids


def _is_loopback(host):
    import ipaddress
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host.lower() == "localhost"


def _is_unicode(text):
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


async def _cancel_on_disconnect(request, req):
    """Cancel req when the client goes away (the body is already read, so the next message is the
    disconnect); cancelled itself when the answer is ready."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    req.cancel()


def _find_runs(root):
    """Runs under root: root itself if a step folder in it has metrics.jsonl, else its children."""
    if root is None or not Path(root).is_dir():
        return {}
    root = Path(root)
    if any(root.glob("*/metrics.jsonl")):
        return {root.name: root}
    return {d.name: d for d in sorted(root.iterdir()) if d.is_dir() and any(d.glob("*/metrics.jsonl"))}


def _read_run(run_dir, max_points=2000):
    """{step: {series: [[x, y], ...]}} from each run_dir/<step>/metrics.jsonl (numeric fields vs 'step')."""
    out = {}
    for path in sorted(run_dir.glob("*/metrics.jsonl")):
        series = {}
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue   # a torn last line while training is still writing
                if not isinstance(rec, dict) or not isinstance(rec.get("step"), (int, float)):
                    continue
                for k, v in rec.items():
                    if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                        series.setdefault(k, []).append([rec["step"], v])
        for k, pts in series.items():   # thin long series evenly, keeping the last point
            if len(pts) > max_points:
                stride = math.ceil(len(pts) / max_points)
                series[k] = pts[::stride] + ([pts[-1]] if (len(pts) - 1) % stride else [])
        out[path.parent.name] = series
    return out


def create_app(engine, tokenizer, model_name="quark", api_key=None, safety=None, runs_dir=None,
               allowed_hosts=LOOPBACK_HOSTS, max_body_bytes=MAX_BODY_BYTES, max_messages=MAX_MESSAGES, chat=None,
               feedback=None):
    """The FastAPI app. safety: a quark.safety.SafetyFilter (check_messages / check_output return a
    Decision: allow, refuse or redact, with the text to use), or None to serve unfiltered.
    allowed_hosts: host names the Host header may carry (None: any, for a public bind behind a proxy).
    chat: the model's chat format (quark.chat.chat_format), Quark's template by default.
    feedback: a quark.feedback.FeedbackStore that POST /v1/feedback writes to, or None (the route answers 404)."""
    from fastapi import Depends, FastAPI, Request
    from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        # uvicorn runs this after open connections have closed: drain whatever is still queued
        await asyncio.to_thread(engine.shutdown, True, 60)

    chat = chat or QuarkChat(tokenizer)
    hosts = None if allowed_hosts is None else {h.lower().strip("[]") for h in allowed_hosts}

    def guard(request: Request):
        """Every route: the Host check, then the API key (except on the public routes)."""
        if hosts is not None and _host_name(request.headers.get("host", "")) not in hosts:
            raise APIError(400, f"Host {request.headers.get('host', '')!r} is not served here (allowed: "
                           f"{', '.join(sorted(hosts))}); start the server with --allowed-host", code="invalid_host")
        if api_key is None or _route(request) in PUBLIC_ROUTES:
            return
        got = request.headers.get("authorization", "")
        if not secrets.compare_digest(got.encode(), f"Bearer {api_key}".encode()):
            raise APIError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                           "authentication_error", code="invalid_api_key")

    app = FastAPI(title="Quark", docs_url=None, redoc_url=None, lifespan=lifespan, dependencies=[Depends(guard)])
    metrics = Metrics()
    app.state.engine, app.state.metrics = engine, metrics
    ctx = engine.max_seq_len

    @app.exception_handler(APIError)
    async def _api_error(request, exc):
        metrics.inc("quark_requests_total", help_="HTTP requests by route and status",
                    route=_route(request), status=str(exc.status))
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def _http_error(request, exc):   # unknown route or method, in OpenAI's error shape
        return await _api_error(request, APIError(exc.status_code, str(exc.detail)))

    async def read_body(request):
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media != "application/json":
            raise APIError(415, f"Content-Type must be application/json, got {media or 'none'!r}",
                           code="unsupported_media_type")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_body_bytes:
            raise APIError(413, f"request body of {declared} bytes exceeds the limit of {max_body_bytes}",
                           code="body_too_large")
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > max_body_bytes:
                raise APIError(413, f"request body exceeds the limit of {max_body_bytes} bytes", code="body_too_large")
        try:
            body = json.loads(raw)
        except RecursionError:
            raise APIError(400, "request body is nested too deeply", code="invalid_json") from None
        except ValueError as e:   # JSONDecodeError, UnicodeDecodeError, an integer of over 4300 digits
            raise APIError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "request body must be a JSON object", code="invalid_json")
        model = body.get("model", model_name)
        if model != model_name:
            raise APIError(404, f"model {model!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")
        if body.get("n", 1) != 1:
            raise APIError(400, "n must be 1", param="n")
        if not isinstance(body.get("stream", False), bool):
            raise APIError(400, "stream must be a boolean", param="stream")
        return body

    def params_from(body, prompt_len, default_max):
        room = ctx - prompt_len
        if room < 1:
            raise APIError(400, f"the prompt is {prompt_len} tokens; this model's context is {ctx} tokens",
                           param="messages" if "messages" in body else "prompt", code="context_length_exceeded")
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        if max_tokens is None:
            max_tokens = min(default_max, room)
        elif isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and max_tokens > room:
            raise APIError(400, f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds this model's "
                           f"context of {ctx} tokens", param="max_tokens", code="context_length_exceeded")
        fields = {k: body[k] for k in ("temperature", "top_p", "top_k", "repetition_penalty", "presence_penalty",
                                       "frequency_penalty", "stop", "seed") if body.get(k) is not None}
        try:
            return SamplingParams(max_tokens=max_tokens, **fields)
        except ValueError as e:
            raise APIError(400, str(e), param=str(e).split()[0]) from None

    def screen(prompt, where):
        """None when allowed (or no filter), else the text to answer instead: a refusal of the prompt
        (every user and system message: a list of chat messages, or one text) or a refused/redacted output."""
        if safety is None:
            return None
        if where == "input":
            messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            decision = safety.check_messages(messages)
        else:
            decision = safety.check_output(prompt)
        if decision.action != "allow":
            metrics.inc("quark_safety_interventions_total", help_="prompts or outputs refused or redacted",
                        where=where, action=decision.action)
            return decision.text
        return None

    async def run(prompt_ids, params, stream, make_chunk, make_final, prompt, request):
        """Submit to the engine; answer a JSON body or an SSE stream built by make_chunk/make_final."""
        route = _route(request)
        def record_refusal():
            metrics.inc("quark_requests_total", help_="HTTP requests by route and status", route=route, status="200")

        refusal = screen(prompt, "input")
        if refusal is not None:   # answered like a model refusal, without generating
            record_refusal()
            if not stream:
                return JSONResponse(make_final(refusal, "content_filter", {"prompt_tokens": len(prompt_ids),
                                    "completion_tokens": 0, "total_tokens": len(prompt_ids)}))

            async def refuse():
                head = make_chunk(None, None)
                if head:
                    yield f"data: {json.dumps(head)}\n\n"
                yield f"data: {json.dumps(make_chunk(refusal, 'content_filter'))}\n\n"
                yield "data: [DONE]\n\n"
            return StreamingResponse(refuse(), media_type="text/event-stream")
        loop = asyncio.get_running_loop()
        events = asyncio.Queue()
        try:
            req = engine.submit(prompt_ids, params,
                                on_event=lambda kind, value: loop.call_soon_threadsafe(events.put_nowait, (kind, value)))
        except QueueFull as e:
            raise APIError(429, str(e), "rate_limit_error", code="queue_full") from None
        except ShuttingDown as e:
            raise APIError(503, str(e), "server_error", code="shutting_down") from None
        except ValueError as e:
            raise APIError(400, str(e), param="prompt", code="context_length_exceeded") from None
        metrics.inc("quark_prompt_tokens_total", len(prompt_ids), help_="prompt tokens processed")

        def record(req, status):
            metrics.inc("quark_requests_total", help_="HTTP requests by route and status", route=route, status=status)
            metrics.inc("quark_completion_tokens_total", len(req.output_ids), help_="tokens generated")
            if req.ttft is not None:
                metrics.observe("quark_time_to_first_token_seconds", req.ttft, "time from submit to first token")
            metrics.observe("quark_request_latency_seconds", time.perf_counter() - req.t_submit, "request latency")

        def usage():
            n = len(req.output_ids)
            return {"prompt_tokens": len(prompt_ids), "completion_tokens": n, "total_tokens": len(prompt_ids) + n}

        if not stream:
            text, finish = [], None
            watcher = asyncio.create_task(_cancel_on_disconnect(request, req))
            try:
                while finish is None:
                    kind, value = await events.get()
                    if kind == "token":
                        text.append(value)
                    else:
                        finish = value
            finally:
                watcher.cancel()
            text = "".join(text)
            if finish.startswith("error"):
                record(req, "500")
                raise APIError(500, f"generation failed ({finish})", "server_error")
            screened = screen(text, "output")
            if screened is not None:
                text, finish = screened, "content_filter"
            record(req, "200")
            return JSONResponse(make_final(text, finish, usage()))

        async def sse():
            sent = []
            try:
                head = make_chunk(None, None)   # chat streams open with the assistant role
                if head:
                    yield f"data: {json.dumps(head)}\n\n"
                while True:
                    kind, value = await events.get()
                    if kind == "token":
                        sent.append(value)
                        if screen("".join(sent), "output") is not None:   # sent text cannot be taken back: stop here
                            req.cancel()
                            yield f"data: {json.dumps(make_chunk('', 'content_filter'))}\n\n"
                            break
                        yield f"data: {json.dumps(make_chunk(value, None))}\n\n"
                    else:
                        if value.startswith("error"):
                            yield f"data: {json.dumps(APIError(500, value, 'server_error').body())}\n\n"
                        else:
                            yield f"data: {json.dumps(make_chunk('', value) | {'usage': usage()})}\n\n"
                        break
                yield "data: [DONE]\n\n"
                record(req, "200")
            finally:
                if not req.done.is_set():   # client went away: free the slot
                    req.cancel()

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_body(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise APIError(400, "prompt must be a non-empty string", param="prompt")
        if not _is_unicode(prompt):
            raise APIError(400, "prompt is not valid Unicode (it holds a lone surrogate)", param="prompt")
        ids = await asyncio.to_thread(_encode, tokenizer, prompt)
        if not ids:
            raise APIError(400, "prompt encodes to no tokens", param="prompt")
        params = params_from(body, len(ids), 16)
        cid, created = f"cmpl-{secrets.token_hex(12)}", int(time.time())

        def chunk(text, finish):
            if text is None:
                return None
            return {"id": cid, "object": "text_completion", "created": created, "model": model_name,
                    "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}

        def final(text, finish, usage):
            return chunk(text, finish) | {"usage": usage}

        return await run(ids, params, body.get("stream", False), chunk, final, prompt, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_body(request)
        messages = body.get("messages")
        if isinstance(messages, list) and len(messages) > max_messages:
            raise APIError(400, f"messages holds {len(messages)} messages; at most {max_messages} are allowed",
                           param="messages")
        try:
            validate_messages(messages)
            ids, _ = await asyncio.to_thread(chat.encode, messages, True)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        params = params_from(body, len(ids), 256)
        cid, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())

        def chunk(text, finish):
            delta = {"role": "assistant", "content": ""} if text is None else ({"content": text} if text else {})
            return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        def final(text, finish, usage):
            return {"id": cid, "object": "chat.completion", "created": created, "model": model_name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "logprobs": None, "finish_reason": finish}], "usage": usage}

        return await run(ids, params, body.get("stream", False), chunk, final, messages, request)

    @app.post("/v1/feedback")
    async def post_feedback(request: Request):
        """{"messages": [...], "response": str, "rating": "up"|"down", "correction"?: str, "response_id"?: str,
        "request_id"?: str} -> {"id": row, "object": "feedback"}."""
        if feedback is None:
            raise APIError(404, "this server collects no feedback (quark serve RUN stores it under the run, "
                           "or pass --feedback DB)", code="not_found")
        body = await read_body(request)
        unknown = set(body) - {"model", "messages", "response", "rating", "correction", "response_id", "request_id"}
        if unknown:
            raise APIError(400, f"unknown feedback fields: {', '.join(sorted(unknown))}", param=sorted(unknown)[0])
        messages = body.get("messages")
        if isinstance(messages, list) and len(messages) > max_messages:
            raise APIError(400, f"messages holds {len(messages)} messages; at most {max_messages} are allowed",
                           param="messages")
        if body.get("rating") not in ("up", "down"):
            raise APIError(400, f"rating must be 'up' or 'down', got {body.get('rating')!r}", param="rating")
        for key in ("response", "correction", "response_id", "request_id"):
            value = body.get(key)
            if value is not None and (not isinstance(value, str) or not _is_unicode(value)
                                      or (key.endswith("_id") and len(value) > 128)):
                raise APIError(400, f"{key} must be a string{' of at most 128 characters' if key.endswith('_id') else ''}",
                               param=key)
        try:
            validate_messages(messages)
            row = await asyncio.to_thread(feedback.record, messages, body.get("response"), body["rating"], model_name,
                                          None, body.get("correction"), body.get("request_id"), body.get("response_id"))
        except ValueError as e:
            raise APIError(400, str(e), param=str(e).split()[0]) from None
        metrics.inc("quark_feedback_total", help_="ratings received", rating=body["rating"])
        return {"id": row, "object": "feedback"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "quark",
                                            "context_length": ctx}]}

    @app.get("/health")
    async def health():
        ok = engine.accepting and engine.thread is not None and engine.thread.is_alive()
        return JSONResponse({"status": "ok" if ok else "unavailable", "model": model_name,
                             "active": engine.num_active, "queued": engine.queue_depth},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus():
        gauges = {"quark_queue_depth": ("requests waiting for a batch slot", engine.queue_depth),
                  "quark_active_requests": ("requests in the running batch", engine.num_active),
                  "quark_engine_decode_steps": ("decode steps run by the engine", engine.steps)}
        return PlainTextResponse(metrics.render(gauges), media_type="text/plain; version=0.0.4")

    @app.get("/")
    async def chat_page():
        return FileResponse(STATIC / "chat.html")

    @app.get("/runs")
    async def runs_page():
        return FileResponse(STATIC / "runs.html")

    @app.get("/static/{name}")
    async def static(name: str):
        path = STATIC / name
        if "/" in name or name.startswith(".") or not path.is_file():
            raise APIError(404, f"no static file {name!r}", code="not_found")
        return FileResponse(path)

    @app.get("/api/runs")
    async def list_runs():
        return {"runs": sorted(_find_runs(runs_dir))}

    @app.get("/api/runs/{name}")
    async def run_metrics(name: str):
        runs = _find_runs(runs_dir)
        if name not in runs:
            raise APIError(404, f"no run {name!r}; available: {', '.join(sorted(runs)) or 'none'}", code="not_found")
        return {"run": name, "steps": await asyncio.to_thread(_read_run, runs[name])}

    return app


def serve(app, host="127.0.0.1", port=8000, graceful_timeout=30, log_level="info"):
    """Run until SIGINT/SIGTERM, then stop accepting, let open requests finish (up to graceful_timeout
    seconds), drain the engine and return."""
    import uvicorn
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=graceful_timeout)
    uvicorn.Server(config).run()


def configure_parser(p):
    p.add_argument("path", help="a run directory (serves its latest model) or a model directory")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: $QUARK_API_KEY, else none)")
    p.add_argument("--model-name", default=None, help="the id clients send as 'model' (default: the run or model folder name)")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together (KV cache slots)")
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a slot before 429")
    p.add_argument("--cache-dtype", default="fp32", choices=["fp32", "bf16", "int8"])
    p.add_argument("--safety", nargs="?", const="auto", default=None, metavar="FILE",
                   help="screen prompts and outputs with a safety filter the run trained (FILE: its safety.json; "
                        "default: RUN/redteam/safety.json)")
    p.add_argument("--runs-dir", default=None, help="runs shown on /runs (default: the served run directory)")
    p.add_argument("--allowed-host", action="append", default=None, metavar="NAME",
                   help="a host name clients may send in the Host header (repeatable; default: the loopback "
                        "names when --host is loopback, else any host)")
    p.add_argument("--feedback", default=None, metavar="DB",
                   help="SQLite file that POST /v1/feedback writes (default: RUN/feedback/feedback.sqlite when "
                        "serving a run; 'off' collects none)")


def run_cli(args):
    import os

    from quark.infer.engine import Engine, load_for_serving
    model, tokenizer, model_dir, run_dir = load_for_serving(args.path)
    safety = None
    if args.safety:
        from quark.safety import SafetyFilter
        if args.safety == "auto" and run_dir is None:
            print(f"error: --safety: {args.path} is a model directory; name the filter file "
                  "(--safety RUN/redteam/safety.json)", file=sys.stderr)
            return 2
        try:
            safety = SafetyFilter.load(run_dir / "redteam" / "safety.json" if args.safety == "auto" else args.safety)
        except (FileNotFoundError, ValueError) as e:
            print(f"error: --safety: {e}", file=sys.stderr)
            return 2
    feedback = None
    if args.feedback != "off" and (args.feedback or run_dir is not None):
        from quark.feedback import FeedbackStore
        feedback = FeedbackStore(args.feedback or run_dir / "feedback" / "feedback.sqlite")
    chat = chat_format(tokenizer, model_dir)   # the checkpoint's own template and eos ids, else Quark's
    engine = Engine(model, tokenizer, max_batch=args.max_batch, max_queue=args.max_queue, cache_dtype=args.cache_dtype,
                    stop_ids=chat.stop_ids)
    name = args.model_name or (run_dir or model_dir).name
    hosts = args.allowed_host or (LOOPBACK_HOSTS if _is_loopback(args.host) else None)
    app = create_app(engine, tokenizer, name, api_key=args.api_key or os.environ.get("QUARK_API_KEY"),
                     safety=safety, runs_dir=args.runs_dir or run_dir, allowed_hosts=hosts, chat=chat,
                     feedback=feedback)
    print(f"serving {model_dir} as {name!r} on http://{args.host}:{args.port} (chat UI at /, runs at /runs)")
    serve(app, args.host, args.port)
    return 0
