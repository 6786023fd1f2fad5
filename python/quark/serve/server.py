"""OpenAI-compatible HTTP server over the engine (FastAPI + uvicorn), the web UI, and `quark serve`.

Routes: GET /v1/models (the model, and MODEL:NAME for each LoRA adapter, which a request's `model` picks:
quark.infer.lora batches them together); POST /v1/completions and /v1/chat/completions (`stream: true` answers
server-sent events, `data: {chunk}` lines ending with `data: [DONE]`), POST /v1/embeddings; POST /v1/feedback (a
rating of a response, stored in the run's feedback database, quark.feedback); GET /health;
GET /metrics (Prometheus text); GET / (chat page), /runs (training metrics page), /api/runs[/NAME].
OpenAI fields served: n (choice i samples with seed + i), logprobs/top_logprobs (the model's own
log-softmax), stop, seed, stream_options.include_usage, completions' token-id prompts, prompt lists and
echo; response_format json_object / json_schema and tool_choice "required" / a named function are
enforced by constrained decoding (quark.infer.constrain); tools render through the chat template and
tool_choice "auto" reads calls back from the output in quark.chat's <tool_call> syntax.
`quark serve --draft DIR` or `--prompt-lookup` decodes speculatively (quark.infer.speculative; the same
greedy text and sampling distribution, fewer passes over the model's weights at small batches).
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
import base64
import contextlib
import dataclasses
import json
import math
import secrets
import struct
import sys
import threading
import time
from pathlib import Path

import torch

from quark.chat import QuarkChat, chat_format, parse_tool_calls, validate_messages
from quark.infer.constrain import Constraint, json_schema_grammar, tool_call_grammar
from quark.infer.engine import QueueFull, ShuttingDown
from quark.infer.sampling import MAX_LOGPROBS, SamplingParams
from quark.serve.generate import add_speculation_args, speculation

STATIC = Path(__file__).parent / "static"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
MAX_BODY_BYTES = 1 << 20
MAX_MESSAGES = 512
MAX_N = 8                # choices per prompt (n)
MAX_CHOICES = 16         # choices per request (prompts x n)
MAX_TOOLS = 128
MAX_TOOL_CALLS = 4       # parallel calls one forced answer may hold
MAX_EMBED_INPUTS = 256
TOOL_OPEN = "<tool_call>"
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


def _sse(chunks):
    """One server-sent event per chunk (a dict, or a list of them)."""
    return "".join(f"data: {json.dumps(c)}\n\n" for c in (chunks if isinstance(chunks, list) else [chunks]))


def _is_token_id(x):
    return isinstance(x, int) and not isinstance(x, bool)


def _one_or_many(value, cap, param, message):
    """One item (a string or a list of token ids) or a list of up to cap of them -> a list of items."""
    if isinstance(value, str) or (isinstance(value, list) and value and all(_is_token_id(t) for t in value)):
        value = [value]
    if not isinstance(value, list) or not value or len(value) > cap:
        raise APIError(400, message, param=param)
    return value


class ToolStream:
    """Splits a streamed answer into content and tool calls (quark.chat's <tool_call> syntax): content is
    sent up to the first call (holding back a tail that may start one), each call once it closes."""

    def __init__(self):
        self.text, self.sent, self.sent_calls = "", 0, 0

    def feed(self, delta, done=False):
        """-> (content to send now, [(name, arguments)] calls completed since the last feed)."""
        self.text += delta
        at = self.text.find(TOOL_OPEN)
        if at >= 0:
            safe = at
        elif done:
            safe = len(self.text)
        else:
            safe = len(self.text) - next((n for n in range(len(TOOL_OPEN) - 1, 0, -1)
                                          if self.text.endswith(TOOL_OPEN[:n])), 0)
        content = self.text[self.sent:safe] if safe > self.sent else ""
        self.sent = max(self.sent, safe)
        calls = parse_tool_calls(self.text[at:])[1] if at >= 0 else []
        new, self.sent_calls = calls[self.sent_calls:], len(calls)
        if done and at >= 0 and not calls:   # an unfinished call: its text is content after all
            content, self.sent = content + self.text[self.sent:], len(self.text)
        return content, new


@torch.no_grad()
def embed(model, ids):
    """Token id lists -> unit vectors: the served model's last hidden state mean-pooled over the tokens
    (quark.retrieval's QuarkEmbedder pools the same way, so a retrieval index can use this server)."""
    out = []
    for x in ids:
        h = model.hidden_states(torch.tensor([x])).float()[0].mean(0)                 # (d,)
        out.append((h / h.norm().clamp_min(1e-12)).tolist())
    return out


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


async def _cancel_on_disconnect(request, reqs):
    """Cancel every request of reqs when the client goes away (the body is already read, so the next
    message is the disconnect); cancelled itself when the answer is ready."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    for req in reqs:
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
    vocab = engine.runner.cfg.vocab_size
    eos_id = min(engine.stop_ids, default=None)   # ends constrained output (any stop id ends a request)

    @app.exception_handler(APIError)
    async def _api_error(request, exc):
        metrics.inc("quark_requests_total", help_="HTTP requests by route and status",
                    route=_route(request), status=str(exc.status))
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def _http_error(request, exc):   # unknown route or method, in OpenAI's error shape
        return await _api_error(request, APIError(exc.status_code, str(exc.detail)))

    def model_of(body):
        """-> (the model id a request names, its adapter or None): the base name (or none) runs the base,
        'base:NAME' the engine's adapter NAME; anything else is a 404 naming the field."""
        model = body.get("model")
        if model is None or model == model_name:
            return model_name, None
        adapter = model[len(model_name) + 1:] if isinstance(model, str) and model.startswith(f"{model_name}:") else None
        if adapter not in engine.adapters:
            raise APIError(404, f"model {model!r} does not exist; this server serves {', '.join(map(repr, model_ids()))}",
                           param="model", code="model_not_found")
        return model, adapter

    def model_ids():
        return [model_name] + [f"{model_name}:{a}" for a in engine.adapters]

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
        model_of(body)
        if not isinstance(body.get("stream", False), bool):
            raise APIError(400, "stream must be a boolean", param="stream")
        return body

    def params_from(body, prompt_len, default_max, logprobs=None, prompt_logprobs=False):
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
            return SamplingParams(max_tokens=max_tokens, logprobs=logprobs, prompt_logprobs=prompt_logprobs, **fields)
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

    async def run(choices, stream, make_chunk, make_final, prompt, request, include_usage=False, adapter=None):
        """Submit every choice (prompt_ids, params, processor) to the engine, running adapter (a LoRA
        adapter's name, or None for the base); answer one JSON body or one
        SSE stream built by make_chunk(index, text, finish, req, logprobs) / make_final(outputs, usage).
        The choices of a request run side by side in the batch; a failure in one fails the request only."""
        route = _route(request)
        prompt_tokens = sum(len(ids) for ids in {tuple(c[0]) for c in choices})
        def record_refusal():
            metrics.inc("quark_requests_total", help_="HTTP requests by route and status", route=route, status="200")

        refusal = screen(prompt, "input")
        if refusal is not None:   # answered like a model refusal, without generating
            record_refusal()
            zero = {"prompt_tokens": prompt_tokens, "completion_tokens": 0, "total_tokens": prompt_tokens}
            if not stream:
                return JSONResponse(make_final([(refusal, "content_filter", None)] * len(choices), zero))

            async def refuse():
                for i in range(len(choices)):
                    head = make_chunk(i, None, None, None, None)
                    if head:
                        yield f"data: {json.dumps(head)}\n\n"
                    yield _sse(make_chunk(i, refusal, 'content_filter', None, None))
                if include_usage:
                    yield f"data: {json.dumps(make_chunk(None, None, None, None, None) | {'usage': zero})}\n\n"
                yield "data: [DONE]\n\n"
            return StreamingResponse(refuse(), media_type="text/event-stream")
        loop = asyncio.get_running_loop()
        events = asyncio.Queue()
        reqs = []
        try:
            for i, (ids, params, processor) in enumerate(choices):
                reqs.append(engine.submit(ids, params, processor=processor, adapter=adapter, on_event=lambda kind, value, i=i:
                                          loop.call_soon_threadsafe(events.put_nowait, (i, kind, value))))
        except (QueueFull, ShuttingDown, ValueError) as e:
            for r in reqs:   # all choices or none
                r.cancel()
            if isinstance(e, QueueFull):
                raise APIError(429, str(e), "rate_limit_error", code="queue_full") from None
            if isinstance(e, ShuttingDown):
                raise APIError(503, str(e), "server_error", code="shutting_down") from None
            raise APIError(400, str(e), param="prompt", code="context_length_exceeded") from None
        metrics.inc("quark_prompt_tokens_total", prompt_tokens, help_="prompt tokens processed")

        def record(status):
            metrics.inc("quark_requests_total", help_="HTTP requests by route and status", route=route, status=status)
            for req in reqs:
                metrics.inc("quark_completion_tokens_total", len(req.output_ids), help_="tokens generated")
                if req.ttft is not None:
                    metrics.observe("quark_time_to_first_token_seconds", req.ttft, "time from submit to first token")
            metrics.observe("quark_request_latency_seconds", time.perf_counter() - reqs[0].t_submit, "request latency")

        def usage():
            n = sum(len(r.output_ids) for r in reqs)
            return {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n,
                    "prompt_tokens_details": {"cached_tokens": reqs[0].cached_tokens or 0}}   # from the prefix cache

        if not stream:
            texts, finishes = [[] for _ in reqs], [None] * len(reqs)
            watcher = asyncio.create_task(_cancel_on_disconnect(request, reqs))
            try:
                while None in finishes:
                    i, kind, value = await events.get()
                    if kind == "token":
                        texts[i].append(value)
                    else:
                        finishes[i] = value
            finally:
                watcher.cancel()
            failed = next((f for f in finishes if f.startswith("error")), None)
            if failed:
                record("500")
                raise APIError(500, f"generation failed ({failed})", "server_error")
            outputs = []
            for text, finish, req in zip(texts, finishes, reqs):
                text = "".join(text)
                screened = screen(text, "output")
                outputs.append((screened, "content_filter", req) if screened is not None else (text, finish, req))
            record("200")
            return JSONResponse(make_final(outputs, usage()))

        async def sse():
            sent, lp_sent, open_ = [[] for _ in reqs], [0] * len(reqs), set(range(len(reqs)))
            failed = False
            try:
                for i in range(len(reqs)):   # chat streams open with the assistant role
                    head = make_chunk(i, None, None, reqs[i], None)
                    if head:
                        yield f"data: {json.dumps(head)}\n\n"
                while open_:
                    i, kind, value = await events.get()
                    req = reqs[i]
                    if i not in open_:
                        continue
                    new_lp = None
                    if req.logprobs is not None:   # (token, entry) for the tokens since this choice's last chunk
                        start, end = lp_sent[i], len(req.logprobs)
                        new_lp, lp_sent[i] = list(zip(req.output_ids[start:end], req.logprobs[start:end])), end
                    if kind == "token":
                        sent[i].append(value)
                        if screen("".join(sent[i]), "output") is not None:   # sent text cannot be taken back
                            req.cancel()
                            open_.discard(i)
                            yield _sse(make_chunk(i, '', 'content_filter', req, None))
                            continue
                        yield _sse(make_chunk(i, value, None, req, new_lp))
                    else:
                        open_.discard(i)
                        if value.startswith("error"):
                            failed = True
                            for r in reqs:
                                r.cancel()
                            yield f"data: {json.dumps(APIError(500, value, 'server_error').body())}\n\n"
                            break
                        yield _sse(make_chunk(i, '', value, req, new_lp))
                if include_usage and not failed:
                    yield f"data: {json.dumps(make_chunk(None, None, None, None, None) | {'usage': usage()})}\n\n"
                yield "data: [DONE]\n\n"
                record("500" if failed else "200")
            finally:
                for r in reqs:
                    if not r.done.is_set():   # client went away: free the slots
                        r.cancel()

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def count(body, name, default, low, high):
        value = body.get(name, default)
        if value is None:
            return default
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise APIError(400, f"{name} must be an integer in [{low}, {high}], got {value!r}", param=name)
        return value

    def flag(body, name):
        value = body.get(name, False)
        if value is None:
            return False
        if not isinstance(value, bool):
            raise APIError(400, f"{name} must be a boolean, got {value!r}", param=name)
        return value

    def stream_usage(body):
        opts = body.get("stream_options")
        if opts is None:
            return False
        if not isinstance(opts, dict) or not isinstance(opts.get("include_usage", False), bool):
            raise APIError(400, "stream_options must be {'include_usage': bool}", param="stream_options")
        if not body.get("stream", False):
            raise APIError(400, "stream_options is only allowed with stream: true", param="stream_options")
        return opts.get("include_usage", False)

    def seeded(params, n):
        """n copies of params; with a seed, choice i uses seed + i (reproducible, and the choices differ)."""
        if params.seed is None:
            return [params] * n
        return [dataclasses.replace(params, seed=(params.seed + i + 2 ** 63) % 2 ** 64 - 2 ** 63) for i in range(n)]

    def piece(token_id):
        return tokenizer.decode([token_id], skip_special_tokens=False)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_body(request)
        model_id, adapter = model_of(body)
        prompts = _one_or_many(body.get("prompt"), MAX_CHOICES, "prompt", "prompt must be a non-empty string, a "
                               f"list of token ids, or a list of at most {MAX_CHOICES} of those")
        n = count(body, "n", 1, 1, MAX_N)
        if len(prompts) * n > MAX_CHOICES:
            raise APIError(400, f"{len(prompts)} prompts x n={n} exceeds {MAX_CHOICES} choices per request", param="n")
        k = count(body, "logprobs", None, 0, MAX_LOGPROBS)
        echo = flag(body, "echo")
        include_usage = stream_usage(body)
        encoded = []
        for p in prompts:
            if isinstance(p, str):
                if not p:
                    raise APIError(400, "prompt must be a non-empty string", param="prompt")
                if not _is_unicode(p):
                    raise APIError(400, "prompt is not valid Unicode (it holds a lone surrogate)", param="prompt")
                ids = await asyncio.to_thread(_encode, tokenizer, p)
                if not ids:
                    raise APIError(400, "prompt encodes to no tokens", param="prompt")
            elif isinstance(p, list) and p and all(_is_token_id(t) for t in p):
                vocab = engine.runner.cfg.vocab_size
                if not all(0 <= t < vocab for t in p):
                    raise APIError(400, f"prompt token ids must lie in [0, {vocab})", param="prompt")
                ids, p = p, tokenizer.decode(p, skip_special_tokens=False)
            else:
                raise APIError(400, "prompt must be a non-empty string or a non-empty list of token ids", param="prompt")
            encoded.append((ids, p))
        params = [params_from(body, len(ids), 16, logprobs=k, prompt_logprobs=echo and k is not None)
                  for ids, _ in encoded]
        choices = [(ids, sp, None) for (ids, _), base in zip(encoded, params) for sp in seeded(base, n)]
        texts = [p for _, p in encoded for _ in range(n)]
        cid, created = f"cmpl-{secrets.token_hex(12)}", int(time.time())

        def logprobs_of(req, entries, offset):
            """OpenAI's completions logprobs: tokens, token_logprobs, top_logprobs, text_offset."""
            out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
            for token, (lp, top) in entries:
                out["tokens"].append(piece(token))
                out["token_logprobs"].append(lp)
                alts = None if top is None else {}
                for t, v in top or ():   # most likely first: ids that decode alike keep the best log-prob
                    alts.setdefault(piece(t), v)
                out["top_logprobs"].append(alts)
                out["text_offset"].append(offset)
                offset += len(out["tokens"][-1])
            return out

        def chunk(i, text, finish, req, lp):
            if i is None:   # the usage chunk
                return {"id": cid, "object": "text_completion", "created": created, "model": model_id, "choices": []}
            if text is None:
                return None
            logprobs = None if lp is None else logprobs_of(req, lp, 0)
            return {"id": cid, "object": "text_completion", "created": created, "model": model_id,
                    "choices": [{"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish}]}

        def final(outputs, usage):
            out = []
            for i, (text, finish, req) in enumerate(outputs):
                logprobs = None
                if req is not None and req.logprobs is not None:
                    entries = list(zip(req.output_ids, req.logprobs))
                    if echo:   # the first prompt token has no log-prob: nothing predicts it
                        entries = ([(req.prompt_ids[0], (None, None))] +
                                   list(zip(req.prompt_ids[1:], req.prompt_logprobs)) + entries)
                    logprobs = logprobs_of(req, entries, 0)
                out.append({"index": i, "text": (texts[i] if echo else "") + text, "logprobs": logprobs,
                            "finish_reason": finish})
            return {"id": cid, "object": "text_completion", "created": created, "model": model_id,
                    "choices": out, "usage": usage}

        if echo and body.get("stream", False):
            raise APIError(400, "echo is not supported with stream: true", param="echo")
        return await run(choices, body.get("stream", False), chunk, final, prompts[0] if len(prompts) == 1 and
                         isinstance(prompts[0], str) else "\n".join(p for _, p in encoded), request, include_usage, adapter)

    def tools_of(body):
        """-> (tools as [{"name", "description", "parameters"}] or None, OpenAI's tool list as given)."""
        tools = body.get("tools")
        if tools is None or tools == []:
            return None, None
        if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
            raise APIError(400, f"tools must be a list of at most {MAX_TOOLS} tools", param="tools")
        out = []
        for j, t in enumerate(tools):
            fn = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
                raise APIError(400, f"tools[{j}] must be {{'type': 'function', 'function': {{'name': str, ...}}}}",
                               param="tools")
            if not isinstance(fn.get("parameters", {}), dict):
                raise APIError(400, f"tools[{j}].function.parameters must be a JSON schema object", param="tools")
            out.append({"name": fn["name"], "parameters": fn.get("parameters") or {"type": "object"}})
        if len({t["name"] for t in out}) != len(out):
            raise APIError(400, "tools: function names must be unique", param="tools")
        return out, tools

    def constraint_for(body, tools):
        """-> (a factory of one Constraint per choice or None, parse tool calls?) from tool_choice and
        response_format; a bad schema or choice is a 400 naming its field."""
        choice = body.get("tool_choice", "auto" if tools else "none")
        fmt = body.get("response_format")
        grammar, field = None, None
        if tools is None and choice not in ("none", None):
            raise APIError(400, "tool_choice needs tools", param="tool_choice")
        if choice == "required" or isinstance(choice, dict):
            if isinstance(choice, dict):
                name = (choice.get("function") or {}).get("name") if choice.get("type") == "function" else None
                named = [t for t in tools if t["name"] == name]
                if not named:
                    raise APIError(400, f"tool_choice names no tool among tools ({', '.join(t['name'] for t in tools)})",
                                   param="tool_choice")
                grammar, field = tool_call_grammar(named, 1), "tool_choice"
            else:
                parallel = body.get("parallel_tool_calls", True) is not False
                grammar, field = tool_call_grammar(tools, MAX_TOOL_CALLS if parallel else 1), "tool_choice"
        elif choice not in ("auto", "none"):
            raise APIError(400, "tool_choice must be 'none', 'auto', 'required' or "
                           "{'type': 'function', 'function': {'name': ...}}", param="tool_choice")
        elif tools is not None:   # checks every tool's parameter schema compiles
            try:
                Constraint(tokenizer, tool_call_grammar(tools, 1), eos_id, vocab)
            except ValueError as e:
                raise APIError(400, f"tools: {e}", param="tools") from None
        if fmt is not None:
            kind = fmt.get("type") if isinstance(fmt, dict) else None
            schema = None
            if kind == "json_object":
                schema = {"type": "object"}
            elif kind == "json_schema":
                spec = fmt.get("json_schema")
                schema = spec.get("schema") if isinstance(spec, dict) else None
                if not isinstance(schema, dict):
                    raise APIError(400, "response_format.json_schema.schema must be a JSON schema object",
                                   param="response_format")
            elif kind != "text":
                raise APIError(400, "response_format.type must be 'text', 'json_object' or 'json_schema'",
                               param="response_format")
            if schema is not None:
                if grammar is not None:
                    raise APIError(400, "response_format cannot be combined with a forced tool_choice",
                                   param="response_format")
                grammar, field = json_schema_grammar(schema), "response_format"
        if grammar is None:
            return None, choice == "auto"
        if eos_id is None:
            raise APIError(400, "this model has no end-of-sequence token to end constrained output", param=field)
        try:
            Constraint(tokenizer, grammar, eos_id, vocab)
        except ValueError as e:
            raise APIError(400, f"{field}: {e}", param=field) from None
        return (lambda: Constraint(tokenizer, grammar, eos_id, vocab)), field == "tool_choice"

    def chat_logprobs(entries):
        """OpenAI's chat logprobs content: [{token, logprob, bytes, top_logprobs: [...]}]."""
        def one(t, lp):
            s = piece(t)
            return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}
        return [one(t, lp) | {"top_logprobs": [one(a, v) for a, v in top]} for t, (lp, top) in entries]

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_body(request)
        model_id, adapter = model_of(body)
        messages = body.get("messages")
        if isinstance(messages, list) and len(messages) > max_messages:
            raise APIError(400, f"messages holds {len(messages)} messages; at most {max_messages} are allowed",
                           param="messages")
        n = count(body, "n", 1, 1, MAX_N)
        want_lp = flag(body, "logprobs")
        k = count(body, "top_logprobs", 0, 0, MAX_LOGPROBS)
        if "top_logprobs" in body and body["top_logprobs"] is not None and not want_lp:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        include_usage = stream_usage(body)
        tools, raw_tools = tools_of(body)
        make_constraint, parse_calls = await asyncio.to_thread(constraint_for, body, tools)
        try:
            validate_messages(messages)
            ids, _ = await asyncio.to_thread(chat.encode, messages, True, raw_tools)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        base = params_from(body, len(ids), 256, logprobs=k if want_lp else None)
        choices = [(ids, sp, make_constraint() if make_constraint else None) for sp in seeded(base, n)]
        cid, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
        streams = [ToolStream() if parse_calls else None for _ in choices]

        def calls_json(calls, first=0):
            return [{"index": first + j, "id": f"call_{secrets.token_hex(12)}", "type": "function",
                     "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}
                    for j, (name, args) in enumerate(calls)]

        def chunk(i, text, finish, req, lp):
            head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model_id}
            if i is None:   # the usage chunk
                return head | {"choices": []}
            if text is None:
                delta = {"role": "assistant", "content": ""}
            elif streams[i] is None:
                delta = {"content": text} if text else {}
            else:   # content up to the first call; each call as it closes: its id and name, then its arguments
                shown, calls = streams[i].feed(text, done=finish is not None)
                delta = {"content": shown} if shown else {}
                first = streams[i].sent_calls - len(calls)
                if calls:
                    delta["tool_calls"] = [c | {"function": {"name": c["function"]["name"], "arguments": ""}}
                                           for c in calls_json(calls, first)]
                    args = [{"index": first + j, "function": {"arguments": json.dumps(a, ensure_ascii=False)}}
                            for j, (_, a) in enumerate(calls)]
                if finish is not None and streams[i].sent_calls and finish == "stop":
                    finish = "tool_calls"
                if calls:
                    return [head | {"choices": [{"index": i, "delta": delta, "logprobs": None, "finish_reason": None}]},
                            head | {"choices": [{"index": i, "delta": {"tool_calls": args}, "logprobs": None,
                                                 "finish_reason": finish}]}]
            logprobs = None if lp is None else {"content": chat_logprobs(lp)}
            return head | {"choices": [{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}

        def final(outputs, usage):
            out = []
            for i, (text, finish, req) in enumerate(outputs):
                message = {"role": "assistant", "content": text}
                if parse_calls and finish != "content_filter":
                    content, calls = parse_tool_calls(text)
                    if calls:
                        message = {"role": "assistant", "content": content, "tool_calls": calls_json(calls)}
                        finish = "tool_calls" if finish == "stop" else finish
                logprobs = None
                if req is not None and req.logprobs is not None:
                    logprobs = {"content": chat_logprobs(list(zip(req.output_ids, req.logprobs)))}
                out.append({"index": i, "message": message, "logprobs": logprobs, "finish_reason": finish})
            return {"id": cid, "object": "chat.completion", "created": created, "model": model_id,
                    "choices": out, "usage": usage}

        return await run(choices, body.get("stream", False), chunk, final, messages, request, include_usage, adapter)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        body = await read_body(request)
        if model_of(body)[1] is not None:
            raise APIError(400, f"model: embeddings come from the base model; send model {model_name!r}", param="model")
        inputs = _one_or_many(body.get("input"), MAX_EMBED_INPUTS, "input",
                              f"input must be a string, token ids, or a list of at most {MAX_EMBED_INPUTS} of those")
        fmt = body.get("encoding_format") or "float"
        if fmt not in ("float", "base64"):
            raise APIError(400, "encoding_format must be 'float' or 'base64'", param="encoding_format")
        ids = []
        for j, x in enumerate(inputs):
            if isinstance(x, str) and x and _is_unicode(x):
                x = await asyncio.to_thread(_encode, tokenizer, x)
            if not (isinstance(x, list) and x and all(_is_token_id(t) and 0 <= t < vocab for t in x)):
                raise APIError(400, f"input[{j}] must be a non-empty string or token ids in [0, {vocab})", param="input")
            if len(x) > ctx:
                raise APIError(400, f"input[{j}] is {len(x)} tokens; this model's context is {ctx}", param="input",
                               code="context_length_exceeded")
            ids.append(x)
        vectors = await asyncio.to_thread(embed, engine.runner.model, ids)
        used = sum(len(x) for x in ids)
        return {"object": "list", "model": model_name, "usage": {"prompt_tokens": used, "total_tokens": used},
                "data": [{"object": "embedding", "index": j, "embedding": v if fmt == "float" else   # little-endian float32
                          base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode()} for j, v in enumerate(vectors)]}

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
            row = await asyncio.to_thread(feedback.record, messages, body.get("response"), body["rating"], model_of(body)[0],
                                          None, body.get("correction"), body.get("request_id"), body.get("response_id"))
        except ValueError as e:
            raise APIError(400, str(e), param=str(e).split()[0]) from None
        metrics.inc("quark_feedback_total", help_="ratings received", rating=body["rating"])
        return {"id": row, "object": "feedback"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": m, "object": "model", "created": 0, "owned_by": "quark",
                                            "context_length": ctx} | ({"parent": model_name} if m != model_name else {})
                                           for m in model_ids()]}

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
                  "quark_engine_decode_steps": ("decode steps run by the engine", engine.steps),
                  "quark_spec_proposed_tokens": ("tokens proposed by speculative decoding and verified",
                                                 engine.spec_proposed),
                  "quark_spec_accepted_tokens": ("proposed tokens the model kept", engine.spec_accepted)}
        if engine.prefix_cache is not None:
            cache = engine.prefix_cache
            gauges |= {"quark_prefix_cache_query_tokens": ("prompt tokens looked up in the prefix cache", cache.query_tokens),
                       "quark_prefix_cache_hit_tokens": ("prompt tokens found in the prefix cache", cache.hit_tokens),
                       "quark_prefix_cache_bytes": ("bytes of KV the prefix cache holds", cache.nbytes)}
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
    p.add_argument("--prefix-cache-mb", type=float, default=256,
                   help="memory for the KV of prompt prefixes shared across requests, evicted least recently used "
                        "(0: no prefix cache)")
    p.add_argument("--prefill-chunk", type=int, default=512,
                   help="prompt tokens prefilled between two decode steps of the running streams (0: whole prompts)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="serve a LoRA adapter of the model (repeatable): Quark's (RUN/sft/adapter, trained on the "
                        "model served: sft's init, named 'base' in its metadata) or a PEFT directory; clients pick it "
                        "with model 'MODEL:NAME', batched with every other request; the plain model name runs none")
    add_speculation_args(p)
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
    adapters = {}
    for spec in args.adapter:
        name, sep, directory = spec.partition("=")
        if not sep or not name or not directory or name in adapters:
            print(f"error: --adapter {spec!r}: expected NAME=DIR with a name not given before", file=sys.stderr)
            return 2
        adapters[name] = directory
    chat = chat_format(tokenizer, model_dir)   # the checkpoint's own template and eos ids, else Quark's
    if args.prefix_cache_mb < 0 or args.prefill_chunk < 0:
        print("error: --prefix-cache-mb and --prefill-chunk must be >= 0", file=sys.stderr)
        return 2
    try:
        engine = Engine(model, tokenizer, max_batch=args.max_batch, max_queue=args.max_queue,
                        cache_dtype=args.cache_dtype, stop_ids=chat.stop_ids, prefix_cache_mb=args.prefix_cache_mb,
                        prefill_chunk=args.prefill_chunk or None, adapters=adapters, **speculation(args))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    name = args.model_name or (run_dir or model_dir).name
    hosts = args.allowed_host or (LOOPBACK_HOSTS if _is_loopback(args.host) else None)
    app = create_app(engine, tokenizer, name, api_key=args.api_key or os.environ.get("QUARK_API_KEY"),
                     safety=safety, runs_dir=args.runs_dir or run_dir, allowed_hosts=hosts, chat=chat,
                     feedback=feedback)
    print(f"serving {model_dir} as {name!r}" + "".join(f", {name}:{a}" for a in adapters) +
          f" on http://{args.host}:{args.port} (chat UI at /, runs at /runs)")
    serve(app, args.host, args.port)
    return 0
