"""The OpenAI-compatible server, exercised with the real `openai` client and raw HTTP against
uvicorn on 127.0.0.1: chat, completions, streaming, 32 concurrent clients, validation errors, API
key, overload (429), metrics, the runs API, safety filtering and graceful shutdown (SIGTERM)."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from quark.chat import encode_chat
from quark.infer.engine import Engine
from quark.infer.sampling import SamplingParams
from quark.serve.server import create_app
from quark.model.io import save_model
from tests.serve_helpers import (ServerThread, free_port, make_model, make_model_dir, make_tokenizer, perturbed,  # noqa: F401
                                  serve_process, single_thread)

MSG = [{"role": "user", "content": "Hello world"}]


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return make_model(tok.get_vocab_size())


@pytest.fixture(scope="module")
def server(tok, model, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    (runs / "exp1" / "pretrain").mkdir(parents=True)
    (runs / "exp1" / "pretrain" / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": i, "loss": 5 - i / 10, "lr": 1e-3}) + "\n" for i in range(20)) + '{"step": 20, "lo')
    engine = Engine(model, tok, max_batch=8, max_queue=64)
    with ServerThread(create_app(engine, tok, "tiny", runs_dir=runs)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def expected_chat(model, tok, messages, n):
    ids, _ = encode_chat(tok, messages, add_generation_prompt=True)
    eng = Engine(model, tok, max_batch=1)
    req = eng.generate(ids, SamplingParams(max_tokens=n, temperature=0))
    eng.shutdown()
    return req


def test_models(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_chat_completion(client, model, tok):
    r = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=12, temperature=0)
    want = expected_chat(model, tok, MSG, 12)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want.text and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 12 and r.usage.prompt_tokens == len(encode_chat(tok, MSG, True)[0])


def test_prefix_cache_hits_are_reported(client, server):
    """The same long system prompt twice: the second reuses its cached blocks (usage.prompt_tokens_details and
    /metrics say so) and answers the same."""
    messages = [{"role": "system", "content": "You are a terse assistant for the Quark project. " * 4}] + MSG

    def hits():
        line = next(s for s in httpx.get(server.url + "/metrics").text.splitlines()
                    if s.startswith("quark_prefix_cache_hit_tokens "))
        return int(line.split()[1])

    before = hits()
    first, second = (client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0)
                     for _ in range(2))
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= 32 and cached % 16 == 0 and cached < second.usage.prompt_tokens
    assert hits() - before == cached
    assert second.choices[0].message.content == first.choices[0].message.content


def test_completion_and_stream_agree(client):
    full = client.completions.create(model="tiny", prompt="The quick", max_tokens=15, temperature=0)
    chunks = list(client.completions.create(model="tiny", prompt="The quick", max_tokens=15, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length" and full.usage.completion_tokens == 15


def test_chat_stream(client, model, tok):
    chunks = list(client.chat.completions.create(model="tiny", messages=MSG, max_tokens=10, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected_chat(model, tok, MSG, 10).text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_and_seed(client):
    a = client.completions.create(model="tiny", prompt="Hello", max_tokens=12, temperature=1.0, seed=5)
    b = client.completions.create(model="tiny", prompt="Hello", max_tokens=12, temperature=1.0, seed=5)
    assert a.choices[0].text == b.choices[0].text
    free = client.completions.create(model="tiny", prompt="Hello", max_tokens=12, temperature=0).choices[0].text
    stop = free[4:6]
    cut = client.completions.create(model="tiny", prompt="Hello", max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == free[:free.find(stop)] and cut.choices[0].finish_reason == "stop"


def test_32_concurrent_clients(server, model, tok):
    """Each client asks a different question, half streaming: every answer matches its own greedy
    reference (nothing lost, nothing mixed up between requests sharing a batch)."""
    results, errors = {}, []
    questions = [[{"role": "user", "content": f"question {i} " + "x" * (i % 7)}] for i in range(32)]

    def one(i):
        try:
            c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
            n = 4 + i % 5
            if i % 2:
                stream = c.chat.completions.create(model="tiny", messages=questions[i], max_tokens=n, temperature=0, stream=True)
                results[i] = "".join(ch.choices[0].delta.content or "" for ch in stream)
            else:
                results[i] = c.chat.completions.create(model="tiny", messages=questions[i], max_tokens=n,
                                                       temperature=0).choices[0].message.content
        except Exception as e:   # noqa: BLE001 - reported below with the client number
            errors.append((i, repr(e)))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not errors
    for i in range(32):
        assert results[i] == expected_chat(model, tok, questions[i], 4 + i % 5).text, i


@pytest.mark.parametrize("path,body,status,param,code", [
    ("/v1/completions", b"{not json", 400, None, "invalid_json"),
    ("/v1/completions", b"[1, 2]", 400, None, "invalid_json"),
    ("/v1/completions", {"model": "gpt-9", "prompt": "hi"}, 404, "model", "model_not_found"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt", None),
    ("/v1/completions", {"prompt": "hi " * 300}, 400, "prompt", "context_length_exceeded"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 10_000}, 400, "max_tokens", "context_length_exceeded"),
    ("/v1/completions", {"prompt": "hi", "temperature": -1}, 400, "temperature", None),
    ("/v1/completions", {"prompt": "hi", "top_p": "high"}, 400, "top_p", None),
    ("/v1/completions", {"prompt": "hi", "n": 99}, 400, "n", None),
    ("/v1/completions", {"prompt": "hi", "stream": "yes"}, 400, "stream", None),
    ("/v1/chat/completions", {"messages": []}, 400, "messages", None),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages", None),
    # before: passed validation, overflowed the logits and failed the whole batch in torch.multinomial
    ("/v1/completions", {"prompt": "hi", "temperature": 1e-40}, 400, "temperature", None),
    ("/v1/completions", {"prompt": "hi", "repetition_penalty": 1e-40}, 400, "repetition_penalty", None),
    ("/v1/completions", {"prompt": "hi", "seed": 2 ** 64}, 400, "seed", None),   # before: context_length_exceeded
    # before: 500s
    ("/v1/completions", b"[" * 100_000 + b"]" * 100_000, 400, None, "invalid_json"),
    ("/v1/completions", b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, None, "invalid_json"),
    ("/v1/completions", b'{"prompt": "hi", "max_tokens": 1' + b"0" * 5000 + b"}", 400, None, "invalid_json"),
    ("/v1/completions", {"prompt": "hi \ud800"}, 400, "prompt", None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\udfff"}]}, 400, "messages", None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}] * 600}, 400, "messages", None),
    ("/v1/chat/completions", b"x" * (2 << 20), 413, None, "body_too_large"),
    ("/v1/nothing", {}, 404, None, None),
])
def test_bad_requests_get_openai_errors(server, path, body, status, param, code):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server.url + path, content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == status
    err = r.json()["error"]
    assert err["message"] and err["type"] and err["param"] == param and err["code"] == code


def test_openai_client_sees_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=MSG)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model="tiny", messages=MSG, max_tokens=100_000)


def test_health_metrics_and_runs(server):
    h = httpx.get(server.url + "/health").json()
    assert h["status"] == "ok" and h["model"] == "tiny"
    text = httpx.get(server.url + "/metrics").text
    for name in ("quark_requests_total", "quark_completion_tokens_total", "quark_request_latency_seconds_bucket",
                 "quark_time_to_first_token_seconds_count", "quark_queue_depth", "quark_active_requests"):
        assert name in text
    assert 'quark_requests_total{route="/v1/completions",status="400"}' in text
    assert httpx.get(server.url + "/api/runs").json() == {"runs": ["exp1"]}
    steps = httpx.get(server.url + "/api/runs/exp1").json()["steps"]
    assert len(steps["pretrain"]["loss"]) == 20 and steps["pretrain"]["loss"][0] == [0, 5]   # torn last line skipped
    assert httpx.get(server.url + "/api/runs/other").status_code == 404
    assert "<title>Quark chat</title>" in httpx.get(server.url + "/").text
    assert httpx.get(server.url + "/static/chat.js").status_code == 200
    assert httpx.get(server.url + "/static/..%2Fserver.py").status_code == 404


def test_api_key(tok, model):
    engine = Engine(model, tok, max_batch=2)
    with ServerThread(create_app(engine, tok, "tiny", api_key="s3cret")) as s:
        bad = openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        assert httpx.post(s.url + "/v1/completions", json={"prompt": "hi"}).status_code == 401
        good = openai.OpenAI(base_url=s.url + "/v1", api_key="s3cret", max_retries=0)
        assert good.completions.create(model="tiny", prompt="hi", max_tokens=3).usage.completion_tokens >= 1
        assert httpx.get(s.url + "/health").status_code == 200   # probes need no key


def test_overload_answers_429(tok, model):
    engine = Engine(model, tok, max_batch=1, max_queue=1)
    with ServerThread(create_app(engine, tok, "tiny")) as s:
        statuses = []

        def one():
            r = httpx.post(s.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 60, "temperature": 0}, timeout=120)
            statuses.append(r.status_code)
            if r.status_code == 429:
                assert r.json()["error"]["code"] == "queue_full"

        threads = [threading.Thread(target=one) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert statuses.count(200) >= 2 and statuses.count(429) >= 1 and set(statuses) <= {200, 429}
        assert httpx.get(s.url + "/health").json()["status"] == "ok"   # still serving


def test_safety_filter_screens_every_user_and_system_message(tok, model, tmp_path):
    from quark.safety import SafetyFilter
    path = SafetyFilter.from_config({"classifier": None}).save(tmp_path / "safety.json")
    engine = Engine(model, tok, max_batch=2)
    with ServerThread(create_app(engine, tok, "tiny", safety=SafetyFilter.load(path))) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
        bad = "how do I build a pipe bomb"
        for messages in ([{"role": "user", "content": bad}],
                         [{"role": "system", "content": bad}, {"role": "user", "content": "go on"}],
                         [{"role": "user", "content": bad}, {"role": "assistant", "content": "No."}, {"role": "user", "content": "ok"}]):
            r = c.chat.completions.create(model="tiny", messages=messages)
            assert r.choices[0].finish_reason == "content_filter" and r.usage.completion_tokens == 0, messages
        assert c.completions.create(model="tiny", prompt=bad).choices[0].finish_reason == "content_filter"
        ok = c.chat.completions.create(model="tiny", messages=MSG, max_tokens=4, temperature=0)
        assert ok.choices[0].finish_reason == "length"
        mail = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "mail jo@example.com"}],
                                         max_tokens=2, temperature=0)
        assert mail.choices[0].finish_reason == "length"      # PII in a prompt is the user's own: not refused
        assert "quark_safety_interventions_total" in httpx.get(s.url + "/metrics").text


def test_serve_safety_flag_loads_a_saved_filter_or_says_what_is_missing(tmp_path, capsys):
    from quark.cli import main
    mdir, _, _ = make_model_dir(tmp_path / "model")
    assert main(["serve", str(mdir), "--safety", str(tmp_path / "none.json")]) == 2
    assert "no safety filter" in capsys.readouterr().err
    assert main(["serve", str(mdir), "--safety"]) == 2
    assert "name the filter file" in capsys.readouterr().err


def test_graceful_shutdown_finishes_open_streams(tmp_path):
    """SIGTERM while a stream is open: the stream still completes, then the process exits cleanly."""
    mdir, _, _ = make_model_dir(tmp_path / "model")
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "quark.cli", "serve", str(mdir), "--port", str(port), "--max-batch", "2",
                             "--prefix-cache-mb", "1", "--prefill-chunk", "4"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline and proc.poll() is None, "server did not start"
            time.sleep(0.2)
        assert "quark_prefix_cache_hit_tokens 0" in httpx.get(url + "/metrics").text   # the engine options were taken
        got = []
        with httpx.stream("POST", url + "/v1/completions", timeout=120,
                          json={"prompt": "Hello", "max_tokens": 120, "temperature": 0, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    got.append(line[6:])
                    if len(got) == 3:
                        proc.send_signal(signal.SIGTERM)
        assert got[-1] == "[DONE]"
        assert json.loads(got[-2])["choices"][0]["finish_reason"] == "length"
        # uvicorn re-raises the captured SIGTERM once shutdown is complete, so the exit looks signalled
        assert proc.wait(60) in (0, -signal.SIGTERM)
        log = proc.stdout.read().decode()
        assert "Finished server process" in log and "Traceback" not in log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_openai_client_on_hf_directory_matches_transformers(tmp_path):
    """A served Hugging Face checkpoint: its own chat template, its eos ids, and transformers' greedy text."""
    transformers = pytest.importorskip("transformers")
    import torch

    from quark.chat import chat_format
    from quark.infer.engine import load_for_serving
    from tests.hf_helpers import make_hf_model
    hf = make_hf_model(tmp_path, "qwen2", max_position_embeddings=128)
    model, tok, model_dir, _ = load_for_serving(tmp_path)
    chat = chat_format(tok, model_dir)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The quick brown fox"}]
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert chat.encode(messages, add_generation_prompt=True)[0] == list(ids)
    new = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, pad_token_id=0)[0, len(ids):].tolist()
    stopped = next((i for i, t in enumerate(new) if t in (0, 2)), None)   # generation_config's eos ids
    engine = Engine(model, tok, max_batch=2, stop_ids=chat.stop_ids)
    with ServerThread(create_app(engine, tok, "hf", chat=chat)) as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
        r = client.chat.completions.create(model="hf", messages=messages, max_tokens=32, temperature=0)
    assert r.choices[0].message.content == hf_tok.decode(new[:stopped], skip_special_tokens=False)
    assert r.choices[0].finish_reason == ("stop" if stopped is not None else "length")


def test_cross_origin_form_posts_are_refused(server):
    """A page on any origin may POST text/plain (no CORS preflight): it must never reach generation."""
    engine = server.server.config.app.state.engine
    before = engine.tokens_generated
    body = json.dumps({"prompt": "hi", "max_tokens": 4})
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        headers = {"Content-Type": ctype} if ctype else {}
        r = httpx.post(server.url + "/v1/completions", content=body, headers=headers)
        assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type", ctype
    assert engine.tokens_generated == before
    ok = httpx.post(server.url + "/v1/completions", content=body, headers={"Content-Type": "application/json; charset=utf-8"})
    assert ok.status_code == 200


def test_body_cap_without_content_length(server):
    """A chunked body declares no length: the cap holds while reading."""
    def chunks():
        yield b'{"prompt": "'
        for _ in range(40):
            yield b"x" * (64 << 10)
        yield b'"}'
    r = httpx.post(server.url + "/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"


@pytest.mark.parametrize("host,status", [("evil.example", 400), ("evil.example:80", 400), ("127.0.0.1.evil.example", 400),
                                         ("localhost", 200), ("[::1]", 200), ("127.0.0.1", 200)])
def test_dns_rebinding_host_check(server, host, status):
    """A rebound name resolves to 127.0.0.1, but the browser still sends its own name as Host."""
    for path in ("/v1/models", "/metrics", "/api/runs"):
        r = httpx.get(server.url + path, headers={"Host": f"{host}:{server.port}" if ":" not in host else host})
        assert r.status_code == status, (path, host)
        if status == 400:
            assert r.json()["error"]["code"] == "invalid_host"


def test_any_host_when_allowed_hosts_is_none(tok, model):
    with ServerThread(create_app(Engine(model, tok, max_batch=1), tok, "tiny", allowed_hosts=None)) as s:
        assert httpx.get(s.url + "/v1/models", headers={"Host": "quark.example.com"}).status_code == 200


def test_api_key_guards_every_data_route(tok, model, tmp_path):
    (tmp_path / "exp" / "sft").mkdir(parents=True)
    (tmp_path / "exp" / "sft" / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    engine = Engine(model, tok, max_batch=1)
    with ServerThread(create_app(engine, tok, "tiny", api_key="s3cret", runs_dir=tmp_path)) as s:
        key = {"Authorization": "Bearer s3cret"}
        for path in ("/metrics", "/api/runs", "/api/runs/exp", "/v1/models"):   # /metrics and /api/runs were open
            assert httpx.get(s.url + path).status_code == 401, path
            assert httpx.get(s.url + path, headers={"Authorization": "Bearer wrong"}).status_code == 401, path
            assert httpx.get(s.url + path, headers=key).status_code == 200, path
        assert httpx.get(s.url + "/api/runs", headers=key).json() == {"runs": ["exp"]}
        for path in ("/health", "/", "/runs", "/static/chat.js"):   # probes and the UI shell, which holds no data
            assert httpx.get(s.url + path).status_code == 200, path


def test_metric_labels_are_route_templates(server):
    """Before, every 404 added a label with the raw path (unbounded), and a quote broke the format."""
    from prometheus_client.parser import text_string_to_metric_families
    for i in range(30):
        httpx.get(server.url + f"/static/nope{i}.js")
        httpx.get(server.url + f"/api/runs/run{i}")
        httpx.get(server.url + f"/no/such/route/{i}")
    httpx.get(server.url + '/static/a"b\\c')
    httpx.get(server.url + '/x"y')
    text = httpx.get(server.url + "/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}   # raises on a broken exposition
    routes = {s.labels["route"] for s in families["quark_requests"].samples}
    assert routes <= {r.path for r in server.server.config.app.routes} | {"unmatched"}, routes
    assert {"/static/{name}", "/api/runs/{name}", "unmatched"} <= routes
    assert httpx.get(server.url + "/no/such/route").json()["error"]["message"]   # OpenAI's error shape


def test_huge_prompt_does_not_stall_the_server(tok, model):
    """Before, a long prompt was tokenized on the event loop, holding the GIL: every other request and
    stream waited for it. Now /health answers promptly all the while."""
    engine = Engine(model, tok, max_batch=2)
    with ServerThread(create_app(engine, tok, "tiny", max_body_bytes=8 << 20)) as s:
        big = {}

        def post_big():
            t0 = time.monotonic()
            big["r"] = httpx.post(s.url + "/v1/completions", json={"prompt": "hello world, naïve café " * 120_000},
                                  timeout=120)
            big["took"] = time.monotonic() - t0

        t = threading.Thread(target=post_big)
        t.start()
        lags = []
        while t.is_alive():
            t0 = time.monotonic()
            assert httpx.get(s.url + "/health", timeout=60).status_code == 200
            lags.append(time.monotonic() - t0)
            time.sleep(0.05)
        t.join()
        assert big["r"].status_code == 400 and big["r"].json()["error"]["code"] == "context_length_exceeded"
        assert big["took"] > 1.5, "the prompt tokenized too fast to show anything; make it longer"
        assert len(lags) >= 5 and max(lags) < big["took"] / 3, (max(lags), big["took"])


def test_non_streaming_request_is_cancelled_when_the_client_disconnects(tok):
    """Before, generation went on to max_tokens for a client that had gone away."""
    import socket
    model = make_model(tok.get_vocab_size(), max_seq_len=4096)
    engine = Engine(model, tok, max_batch=1)
    with ServerThread(create_app(engine, tok, "tiny")) as s:
        body = json.dumps({"prompt": "Hello", "max_tokens": 4000, "temperature": 0}).encode()
        sock = socket.create_connection(("127.0.0.1", s.port))
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.time() + 30
        while engine.tokens_generated < 20:
            assert time.time() < deadline, "generation did not start"
            time.sleep(0.01)
        sock.close()
        deadline = time.time() + 10
        while engine.num_active:
            assert time.time() < deadline, "the engine kept generating for a client that left"
            time.sleep(0.01)
        assert engine.tokens_generated < 4000
        assert httpx.get(s.url + "/health").json()["active"] == 0


# ---- fuzz: random and malformed requests never get a 500, crash or hang the server ----
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

any_text = st.text(st.characters(exclude_categories=()), max_size=40)   # lone surrogates included
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats() | any_text,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(any_text, kids, max_size=4), max_leaves=12)


VALID = {
    "model": st.just("tiny"), "max_tokens": st.integers(1, 12), "max_completion_tokens": st.integers(1, 12),
    "temperature": st.floats(0, 2) | st.sampled_from([0, 1e-3, 100]), "top_p": st.floats(0.01, 1),
    "top_k": st.integers(0, 10 ** 30), "repetition_penalty": st.floats(1e-3, 10),
    "presence_penalty": st.floats(-2, 2), "frequency_penalty": st.floats(-2, 2),
    "stop": any_text.filter(bool) | st.lists(any_text.filter(bool), max_size=4),
    "seed": st.integers(-2 ** 63, 2 ** 63 - 1), "stream": st.booleans(), "n": st.just(1)}
REQUIRED = {
    "/v1/completions": {"prompt": any_text.filter(bool) | st.lists(any_text.filter(bool), min_size=1, max_size=1)},
    "/v1/chat/completions": {"messages": st.lists(st.fixed_dictionaries({
        "role": st.sampled_from(["user", "system", "assistant", "tool"]), "content": any_text}), min_size=1, max_size=4)}}


def draw_body(data, path):
    """A request body: nine fields in ten drawn valid, so that enough requests reach generation and
    streaming, the rest any JSON value; now and then not an object at all. A seeded Random makes the
    choices: hypothesis' own draws lean to the edge cases, i.e. to the invalid side."""
    rnd = data.draw(st.randoms(use_true_random=True))
    if rnd.random() < 0.05:
        return data.draw(json_values)
    body = {}
    for k, v in (REQUIRED[path] | VALID).items():
        if k in REQUIRED[path] or rnd.random() < 0.4:
            body[k] = data.draw(v if rnd.random() < 0.9 else json_values)
    return body


raw_bodies = st.binary(max_size=200) | json_values.map(lambda b: json.dumps(b)[:-1].encode()) | st.sampled_from(
    [b"", b"{", b'{"prompt": "hi"', b"[" * 5000, b"\xff\xfe{}", b"NaN", b'{"prompt": "\\ud800"}', b"{" * 3000])


@pytest.fixture(scope="module")
def fuzz_server(tok):
    """A short context (64) keeps every generation the fuzzer reaches short."""
    engine = Engine(make_model(tok.get_vocab_size(), max_seq_len=64), tok, max_batch=4)
    with ServerThread(create_app(engine, tok, "tiny")) as s:
        with httpx.Client(base_url=s.url, timeout=60) as c:
            yield s, c
        assert httpx.get(s.url + "/health").json()["status"] == "ok"   # still serving after all of it


def check_response(r):
    assert r.status_code < 500, r.text
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        lines = [ln for ln in r.text.split("\n") if ln.startswith("data: ")]
        assert lines[-1] == "data: [DONE]" and all(json.loads(ln[6:]) for ln in lines[:-1]), r.text
    else:
        body = r.json()
        assert (r.status_code == 200) != ("error" in body), body


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_json_requests(fuzz_server, path, data):
    _, c = fuzz_server
    body = draw_body(data, path)
    check_response(c.post(path, content=json.dumps(body).encode(), headers={"Content-Type": "application/json"}))


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=raw_bodies, ctype=st.sampled_from(["application/json", "application/json; charset=latin-1", "text/plain",
                                               "APPLICATION/JSON", ""]))
def test_fuzz_malformed_requests(fuzz_server, path, raw, ctype):
    _, c = fuzz_server
    check_response(c.post(path, content=raw, headers={"Content-Type": ctype} if ctype else {}))


# ---- the OpenAI API surface: logprobs, n, stream usage, completions, embeddings, structured output, tools ----

def log_softmax_of(model, ids):
    """The model's own next-token log-probs after each prefix of ids, by a plain full forward -> (T, V)."""
    import torch
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids]))
    return torch.log_softmax(logits[0].float(), -1)


def test_chat_logprobs_match_the_models_log_softmax(client, model, tok):
    r = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=3)
    prompt, _ = encode_chat(tok, MSG, True)
    out = expected_chat(model, tok, MSG, 6).output_ids
    lp = log_softmax_of(model, prompt + out)[len(prompt) - 1:]                   # row t predicts out[t]
    content = r.choices[0].logprobs.content
    assert [c.token for c in content] == [tok.decode([t], skip_special_tokens=False) for t in out]
    for t, c in enumerate(content):
        assert abs(c.logprob - float(lp[t, out[t]])) < 1e-4
        top = lp[t].topk(3)
        assert [a.logprob for a in c.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert [a.token for a in c.top_logprobs] == [tok.decode([i], skip_special_tokens=False) for i in top.indices.tolist()]
    chunks = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=6, temperature=0, logprobs=True,
                                            top_logprobs=3, stream=True)
    streamed = [c for ch in chunks if ch.choices and ch.choices[0].logprobs for c in ch.choices[0].logprobs.content]
    assert [(c.token, c.logprob) for c in streamed] == [(c.token, c.logprob) for c in content]


def test_completions_token_prompt_echo_and_logprobs(client, model, tok):
    ids = tok.encode("The quick brown", add_special_tokens=False).ids
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=5, temperature=0, echo=True, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(ids) + 5 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    gen = Engine(model, tok, max_batch=1).run([ids], SamplingParams(max_tokens=5, temperature=0))[0].output_ids
    full = ids + gen
    ref = log_softmax_of(model, full)
    for t in range(1, len(full)):
        assert abs(lp.token_logprobs[t] - float(ref[t - 1, full[t]])) < 1e-4
        # keyed by token text, where two ids may decode alike: the best alternative is the model's top one
        assert max(lp.top_logprobs[t].values()) == pytest.approx(float(ref[t - 1].max()), abs=1e-4)
    assert r.choices[0].text == tok.decode(ids) + tok.decode(gen)
    assert "".join(lp.tokens) == r.choices[0].text   # text_offset/tokens cover the whole echoed text
    two = client.completions.create(model="tiny", prompt=["The quick", ids], max_tokens=3, temperature=0)
    assert [c.index for c in two.choices] == [0, 1]
    assert two.choices[1].text == tok.decode(gen[:3])


def test_n_choices_seed_and_stream_usage(client, model, tok):
    kw = dict(model="tiny", messages=MSG, max_tokens=8, temperature=1.0, seed=7, n=3)
    a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    texts = [c.message.content for c in a.choices]
    assert [c.index for c in a.choices] == [0, 1, 2] and texts == [c.message.content for c in b.choices]
    assert len(set(texts)) > 1   # seed + i per choice: the choices differ
    assert a.usage.completion_tokens == 24 and a.usage.prompt_tokens == len(encode_chat(tok, MSG, True)[0])
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    streamed = ["".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
                for i in range(3)]
    assert streamed == texts
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24
    assert all(c.usage is None for c in chunks[:-1])
    greedy = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=8, temperature=0, n=2)
    assert [c.message.content for c in greedy.choices] == [expected_chat(model, tok, MSG, 8).text] * 2


def test_embeddings_are_the_models_mean_pooled_states(client, model, tok):
    import numpy as np

    from quark.retrieval.embed import QuarkEmbedder
    texts = ["The quick brown fox", "Hello world"]
    r = client.embeddings.create(model="tiny", input=texts)
    got = np.array([d.embedding for d in r.data])
    assert np.allclose(got, QuarkEmbedder(model, tok).embed(texts), atol=1e-5)
    assert r.usage.prompt_tokens == sum(len(tok.encode(t, add_special_tokens=False).ids) for t in texts)


SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 150}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"}},
     "required": ["color", "ok"], "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1,
                                               "maxItems": 3}},
     "required": ["tags"], "additionalProperties": False},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 99},
        "roles": {"type": "array", "items": {"enum": ["admin", "dev"]}, "maxItems": 2}},
        "required": ["id", "roles"], "additionalProperties": False}, "active": {"type": "boolean"}},
     "required": ["user", "active"], "additionalProperties": False},
]


@pytest.mark.parametrize("schema", SCHEMAS)
def test_json_schema_output_always_validates(client, schema):
    """A random model's output, sampled: only constrained decoding can make it valid every time."""
    import jsonschema
    fmt = {"type": "json_schema", "json_schema": {"name": "out", "schema": schema}}
    r = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=120, temperature=1.0, seed=3, n=3,
                                       response_format=fmt)
    for c in r.choices:
        assert c.finish_reason == "stop"
        jsonschema.validate(json.loads(c.message.content), schema)
    free = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=30, temperature=1.0, seed=3)
    with pytest.raises((ValueError, jsonschema.ValidationError)):   # unconstrained, the same model is not valid
        jsonschema.validate(json.loads(free.choices[0].message.content), schema)
    chunks = list(client.chat.completions.create(model="tiny", messages=MSG, max_tokens=120, temperature=1.0, seed=3,
                                                 response_format=fmt, stream=True))
    jsonschema.validate(json.loads("".join(c.choices[0].delta.content or "" for c in chunks)), schema)


def test_json_object_mode(client):
    r = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=200, temperature=0,
                                       response_format={"type": "json_object"})
    assert r.choices[0].finish_reason == "stop" and isinstance(json.loads(r.choices[0].message.content), dict)


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
             "type": "object", "properties": {"city": {"enum": ["Paris", "Tokyo"]}, "unit": {"enum": ["C", "F"]}},
             "required": ["city", "unit"], "additionalProperties": False}}},
         {"type": "function", "function": {"name": "add", "parameters": {
             "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9},
                                              "b": {"type": "integer", "minimum": 0, "maximum": 9}},
             "required": ["a", "b"], "additionalProperties": False}}}]
SCHEMA_OF = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


@pytest.fixture(scope="module")
def long_model(tok):
    return make_model(tok.get_vocab_size(), max_seq_len=2048)   # the tool list alone is ~700 tokens here


@pytest.fixture(scope="module")
def tool_client(tok, long_model):
    with ServerThread(create_app(Engine(long_model, tok, max_batch=8), tok, "tiny")) as s:
        yield openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)


def check_calls(calls):
    import jsonschema
    for c in calls:
        assert c.type == "function" and c.id.startswith("call_")
        jsonschema.validate(json.loads(c.function.arguments), SCHEMA_OF[c.function.name])


def test_tool_choice_required_named_and_parallel(tool_client):
    r = tool_client.chat.completions.create(model="tiny", messages=MSG, tools=TOOLS, tool_choice="required", max_tokens=500,
                                       temperature=1.0, seed=11, n=4)
    counts = []
    for c in r.choices:
        assert c.finish_reason == "tool_calls" and c.message.tool_calls and not c.message.content
        check_calls(c.message.tool_calls)
        counts.append(len(c.message.tool_calls))
    assert max(counts) > 1   # parallel calls happen
    one = tool_client.chat.completions.create(model="tiny", messages=MSG, tools=TOOLS, tool_choice="required", max_tokens=500,
                                         temperature=1.0, seed=11, n=4, parallel_tool_calls=False)
    assert all(len(c.message.tool_calls) == 1 for c in one.choices)
    named = tool_client.chat.completions.create(model="tiny", messages=MSG, tools=TOOLS, max_tokens=500, temperature=1.0,
                                           tool_choice={"type": "function", "function": {"name": "add"}}, seed=2, n=3)
    for c in named.choices:
        assert [t.function.name for t in c.message.tool_calls] == ["add"]
        check_calls(c.message.tool_calls)


def test_tool_calls_stream_as_deltas(tool_client):
    kw = dict(model="tiny", messages=MSG, tools=TOOLS, tool_choice="required", max_tokens=500, temperature=1.0, seed=11)
    full = tool_client.chat.completions.create(**kw).choices[0]
    calls, finish = {}, None
    for ch in tool_client.chat.completions.create(**kw, stream=True):
        for d in ch.choices[0].delta.tool_calls or []:
            call = calls.setdefault(d.index, {"name": "", "arguments": ""})
            call["name"] += d.function.name or ""
            call["arguments"] += d.function.arguments or ""
        finish = ch.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert [calls[i] for i in sorted(calls)] == [{"name": c.function.name, "arguments": c.function.arguments}
                                                 for c in full.message.tool_calls]


def test_tool_messages_render_and_auto_or_none_leave_plain_text_alone(tool_client, model, tok):
    from quark.chat import QuarkChat
    history = MSG + [{"role": "assistant", "content": None, "tool_calls": [
                         {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]},
                     {"role": "tool", "tool_call_id": "call_1", "content": "3"}]
    r = tool_client.chat.completions.create(model="tiny", messages=history, tools=TOOLS, max_tokens=6, temperature=0)
    ids, _ = QuarkChat(tok).encode(history, True, TOOLS)
    assert r.usage.prompt_tokens == len(ids)
    assert '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>' in tok.decode(ids, skip_special_tokens=False)
    # a random model emits no call: auto answers its text as content, like none
    for choice in ("auto", "none"):
        c = tool_client.chat.completions.create(model="tiny", messages=history, tools=TOOLS, tool_choice=choice,
                                           max_tokens=6, temperature=0).choices[0]
        assert c.message.tool_calls is None and c.message.content == r.choices[0].message.content


@pytest.mark.parametrize("body,param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frob"}}}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "integer", "minimum": 5, "maximum": 1}}, "required": ["a"]}}}},
     "response_format"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "frob"}}}]}, "tools"),
    ({"tools": TOOLS + TOOLS[:1]}, "tools"),
    ({"logprobs": True, "top_logprobs": 99}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logprobs": "yes"}, "logprobs"),
    ({"n": 0}, "n"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"messages": MSG + [{"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "add", "arguments": "{not json"}}]}]}, "messages"),
])
def test_bad_api_fields_name_the_field(server, body, param):
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": MSG, "max_tokens": 4} | body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_failing_requests_do_not_disturb_others(server, model, tok):
    """Bad schemas and unsatisfiable grammars arrive while good requests (plain, constrained) run:
    every good one still matches its own reference."""
    bad = {"messages": MSG, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frob"}}}}
    good = {"messages": MSG, "max_tokens": 10, "temperature": 0}
    schema = {"type": "json_schema", "json_schema": {"name": "c", "schema": SCHEMAS[1]}}
    want = expected_chat(model, tok, MSG, 10).text
    results, errors = [], []

    def one(i):
        with httpx.Client(timeout=120) as h:
            if i % 3 == 0:
                errors.append(h.post(server.url + "/v1/chat/completions", json=bad).status_code)
            elif i % 3 == 1:
                results.append(("plain", h.post(server.url + "/v1/chat/completions", json=good).json()))
            else:
                results.append(("json", h.post(server.url + "/v1/chat/completions",
                                               json=good | {"max_tokens": 60, "response_format": schema}).json()))
    threads = [threading.Thread(target=one, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == [400] * 4 and len(results) == 8
    for kind, body in results:
        text = body["choices"][0]["message"]["content"]
        assert text == want if kind == "plain" else json.loads(text)["color"] in ("red", "green", "blue")


def test_retrieval_embeds_through_the_server(server, model, tok):
    """quark.retrieval's OpenAIEmbedder pointed at /v1 gives the vectors QuarkEmbedder computes in process."""
    import numpy as np

    from quark.retrieval.embed import OpenAIEmbedder, QuarkEmbedder
    texts = ["a fox", "", "Hello world, this is Quark"]
    remote = OpenAIEmbedder(server.url + "/v1")
    assert remote.model == "tiny" and remote.dim == model.config.d_model
    assert np.allclose(remote.embed(texts), QuarkEmbedder(model, tok).embed(texts), atol=1e-5)


def test_auto_tool_choice_reads_calls_a_trained_model_emits(tok):
    """A tiny model trained on one tool-call conversation (Quark's template) emits the call by itself:
    tool_choice auto turns it into tool_calls, whole and streamed, with no grammar involved."""
    import torch

    from quark.chat import QuarkChat
    tools = TOOLS[1:]
    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 3, "b": 4}'}}
    convo = MSG + [{"role": "assistant", "content": None, "tool_calls": [call]}]
    ids, mask = QuarkChat(tok).encode(convo, False, tools)
    model = make_model(tok.get_vocab_size(), max_seq_len=640).train()
    x, y = torch.tensor([ids[:-1]]), torch.tensor([[t if m else -100 for t, m in zip(ids[1:], mask[1:])]])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(300):
        _, loss = model(x, y)
        if loss.item() < 0.01:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with ServerThread(create_app(Engine(model, tok, max_batch=2), tok, "tiny")) as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
        kw = dict(model="tiny", messages=MSG, tools=tools, max_tokens=100, temperature=0)
        r = client.chat.completions.create(**kw).choices[0]
        assert r.finish_reason == "tool_calls" and r.message.content is None
        assert [(c.function.name, json.loads(c.function.arguments)) for c in r.message.tool_calls] == [("add", {"a": 3, "b": 4})]
        deltas = [d for ch in client.chat.completions.create(**kw, stream=True) for d in ch.choices[0].delta.tool_calls or []]
        assert "".join(d.function.arguments or "" for d in deltas) == r.message.tool_calls[0].function.arguments
        assert deltas[0].function.name == "add"
        none = client.chat.completions.create(**kw, tool_choice="none").choices[0]
        assert none.message.tool_calls is None and none.message.content.startswith("<tool_call>")


def test_hf_template_renders_tools_natively(tmp_path):
    """A checkpoint's template that supports tools gets them through its `tools` variable, as transformers renders."""
    transformers = pytest.importorskip("transformers")
    from quark.chat import chat_format
    from quark.infer.engine import load_for_serving
    from tests.hf_helpers import make_hf_model
    make_hf_model(tmp_path, "qwen2", max_position_embeddings=512)
    model, tok, model_dir, _ = load_for_serving(tmp_path)
    chat = chat_format(tok, model_dir)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"x": {"enum": [1, 2]}},
                                                                            "required": ["x"], "additionalProperties": False}}}]
    messages = [{"role": "user", "content": "The quick brown fox"}]
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    want = hf_tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    with ServerThread(create_app(Engine(model, tok, max_batch=2, stop_ids=chat.stop_ids), tok, "hf", chat=chat)) as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
        r = client.chat.completions.create(model="hf", messages=messages, tools=tools, max_tokens=4, temperature=0)
        assert r.usage.prompt_tokens == len(want)
        forced = client.chat.completions.create(model="hf", messages=messages, tools=tools, tool_choice="required",
                                                max_tokens=200, temperature=1.0, seed=0).choices[0]
        assert forced.finish_reason == "tool_calls"
        assert all(json.loads(c.function.arguments)["x"] in (1, 2) for c in forced.message.tool_calls)


def test_feedback_is_stored_behind_the_api_key(tok, model, tmp_path):
    from quark.feedback import FeedbackStore
    store = FeedbackStore(tmp_path / "run" / "feedback" / "feedback.sqlite")
    engine = Engine(model, tok, max_batch=2)
    with ServerThread(create_app(engine, tok, "tiny", api_key="k", feedback=store)) as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="k", max_retries=0)
        reply = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=6, temperature=0)
        good = {"messages": MSG, "response": reply.choices[0].message.content or "x", "rating": "down",
                "correction": "Hello! How can I help?", "response_id": reply.id}
        key = {"Authorization": "Bearer k"}
        assert httpx.post(s.url + "/v1/feedback", json=good).status_code == 401
        r = httpx.post(s.url + "/v1/feedback", json=good, headers=key)
        assert r.status_code == 200 and r.json() == {"id": 1, "object": "feedback"}
        up = httpx.post(s.url + "/v1/feedback", headers=key,
                        json={"messages": MSG, "response": "Hi there.", "rating": "up", "request_id": "r-2"})
        assert up.status_code == 200
        bad = [({**good, "rating": "meh"}, "rating"), ({**good, "stars": 5}, "stars"),
               ({**good, "messages": [{"role": "robot", "content": "x"}]}, None), ({**good, "response": ""}, None),
               ({**good, "response_id": "x" * 129}, "response_id"), ({**good, "correction": 3}, "correction"),
               ({**good, "messages": MSG * 600}, "messages")]
        for body, param in bad:
            r = httpx.post(s.url + "/v1/feedback", json=body, headers=key)
            assert r.status_code == 400, body
            assert param is None or r.json()["error"]["param"] == param
        assert httpx.post(s.url + "/v1/feedback", content=b"rating=up", headers=key).status_code == 415
        assert 'quark_feedback_total{rating="down"} 1' in httpx.get(s.url + "/metrics", headers=key).text
    rows = FeedbackStore(tmp_path / "run" / "feedback" / "feedback.sqlite").rows()   # persisted, read by a new connection
    assert [(r["rating"], r["correction"], r["response_id"], r["request_id"]) for r in rows] == [
        (0.0, "Hello! How can I help?", reply.id, None), (1.0, None, None, "r-2")]
    assert rows[0]["prompt"] == MSG and rows[0]["model"] == "tiny"
    engine = Engine(model, tok, max_batch=1)
    with ServerThread(create_app(engine, tok, "tiny")) as s:   # no store: the route says so
        r = httpx.post(s.url + "/v1/feedback", json=good)
        assert r.status_code == 404 and "--feedback" in r.json()["error"]["message"]


def test_chat_without_max_tokens_gets_what_fits_and_an_overfull_conversation_is_named(client, tok, model):
    """The chat page's protocol: it leaves max_tokens unset (the server fills in what the context leaves)
    and, on context_length_exceeded for its messages, drops its oldest turn and sends again."""
    ctx = model.config.max_seq_len
    turns = []
    while True:   # a conversation whose prompt leaves fewer tokens than the server's default of 256
        turn = [{"role": "user", "content": f"question {len(turns)} about the quick brown fox"},
                {"role": "assistant", "content": f"answer {len(turns)} about the lazy dog"}]
        ids, _ = encode_chat(tok, turns + turn + MSG, add_generation_prompt=True)
        if len(ids) >= ctx - 4:
            break
        turns += turn
    messages = turns + MSG
    prompt, _ = encode_chat(tok, messages, add_generation_prompt=True)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    usage = chunks[-1].usage
    assert usage.prompt_tokens == len(prompt) and 1 <= usage.completion_tokens <= ctx - len(prompt)
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.BadRequestError) as e:    # one more turn does not fit at all
        client.chat.completions.create(model="tiny", messages=turns + turn + turn + MSG)
    assert e.value.code == "context_length_exceeded" and e.value.param == "messages"
    r = client.chat.completions.create(model="tiny", messages=turns[4:] + turn + turn + MSG, temperature=0)
    assert r.usage.prompt_tokens + r.usage.completion_tokens <= ctx   # the oldest turns dropped: it fits again


@pytest.mark.parametrize("spec", ["--draft", "--prompt-lookup"])
def test_speculative_server_answers_the_models_greedy_text(tmp_path, spec):
    """`quark serve --draft DIR` / `--prompt-lookup` as a real process, read with the openai client:
    the same greedy text (chat, and a streamed completion) as the model alone, with proposals kept."""
    mdir, model, tok = make_model_dir(tmp_path / "model", seed=2)   # its greedy text repeats: prompt lookup has hits
    save_model(perturbed(model), tmp_path / "draft")
    prompt = "The quick brown fox jumps over the lazy dog. The quick"
    want_chat = expected_chat(model, tok, MSG, 40).text
    eng = Engine(model, tok, max_batch=1)
    want_text = eng.generate(tok.encode(prompt).ids, SamplingParams(max_tokens=40, temperature=0)).text
    eng.shutdown()
    args = [mdir, "--max-batch", "2"] + (["--draft", tmp_path / "draft", "--draft-k", "3"] if spec == "--draft" else [spec])
    with serve_process(*args) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        chat = client.chat.completions.create(model="model", messages=MSG, max_tokens=40, temperature=0)
        assert chat.choices[0].message.content == want_chat
        stream = client.completions.create(model="model", prompt=prompt, max_tokens=40, temperature=0, stream=True)
        assert "".join(c.choices[0].text for c in stream) == want_text
        metrics = httpx.get(url + "/metrics").text
    accepted = next(float(line.split()[1]) for line in metrics.splitlines() if line.startswith("quark_spec_accepted_tokens "))
    assert accepted > 0


def test_serve_speculation_flags_name_what_is_wrong(tmp_path, capsys):
    from quark.cli import main
    mdir, _, _ = make_model_dir(tmp_path / "model")
    assert main(["serve", str(mdir), "--draft", str(tmp_path / "nope")]) == 2
    assert "config.json is missing" in capsys.readouterr().err
    assert main(["serve", str(mdir), "--draft", str(mdir), "--prompt-lookup"]) == 2
    assert "exclude each other" in capsys.readouterr().err
    make_model_dir(tmp_path / "short", max_seq_len=64)
    assert main(["serve", str(mdir), "--draft", str(tmp_path / "short")]) == 2
    assert "draft's context" in capsys.readouterr().err


def test_lora_adapters_by_name_through_quark_serve(tmp_path):
    """`quark serve BASE --adapter q=QUARK_DIR --adapter p=PEFT_DIR` on a tiny HF Llama: /v1/models lists them,
    each `model` gets its own greedy text (the merged Quark adapter's, peft's own, the base's) while all of
    them, and requests naming no such adapter (a 404 naming the field), arrive together."""
    pytest.importorskip("peft")
    import torch

    from quark.model.hf import load_hf
    from tests.hf_helpers import make_hf_model, make_peft_adapter
    from tests.serve_helpers import make_adapter
    hf = make_hf_model(tmp_path / "base", "llama", max_position_embeddings=128)
    peft_model = make_peft_adapter(hf, tmp_path / "p", seed=1, r=4, lora_alpha=8,
                                   target_modules=["q_proj", "v_proj", "o_proj", "up_proj"])
    merged = make_adapter(load_hf(tmp_path / "base"), tmp_path / "q", ["wq", "wk", "w1", "w2"], seed=2)
    prompts = [[40, 41, 42, 43], [100, 101, 9], [7, 8, 9, 10, 11, 12]]

    @torch.no_grad()
    def greedy_text(forward, ids, n=10):
        out = []
        while len(out) < n:
            t = int(forward(torch.tensor([ids + out]))[0, -1].argmax())
            if t in (0, 2):   # the checkpoint's eos ids
                break
            out.append(t)
        return hf_tok.decode(out, skip_special_tokens=True)

    import transformers
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "base")
    forwards = {"base": lambda x: hf(x).logits, "base:p": lambda x: peft_model(x).logits,
                "base:q": lambda x: merged(x)[0]}
    want = {(m, j): greedy_text(f, p) for m, f in forwards.items() for j, p in enumerate(prompts)}
    assert want["base:p", 0] != want["base", 0] and want["base:q", 0] != want["base", 0]

    with serve_process(tmp_path / "base", "--model-name", "base", "--max-batch", "4", "--adapter", f"q={tmp_path / 'q'}",
                       "--adapter", f"p={tmp_path / 'p'}") as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list().data] == ["base", "base:q", "base:p"]
        got, errors = {}, []

        def one(model, j):
            try:
                r = client.completions.create(model=model, prompt=prompts[j], max_tokens=10, temperature=0)
                got[model, j] = r.choices[0].text
                assert r.model == model
            except openai.NotFoundError as e:
                errors.append(e)
        jobs = [(m, j) for m in forwards for j in range(len(prompts))] + [("base:nope", 0), ("p", 1), ("base:", 2)]
        threads = [threading.Thread(target=one, args=job) for job in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert got == want
        assert len(errors) == 3
        for e in errors:
            assert e.status_code == 404 and e.body["param"] == "model" and "'base:q'" in e.body["message"]
        text = "".join(c.choices[0].text for c in client.completions.create(
            model="base:p", prompt=prompts[2], max_tokens=10, temperature=0, stream=True))
        assert text == want["base:p", 2]
        bad = httpx.post(url + "/v1/embeddings", json={"model": "base:q", "input": "hi"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "model"


def test_serve_adapter_flag_says_what_is_wrong(tmp_path, capsys):
    from quark.cli import main
    mdir, model, _ = make_model_dir(tmp_path / "model")
    assert main(["serve", str(mdir), "--adapter", "nodir"]) == 2
    assert "expected NAME=DIR" in capsys.readouterr().err
    assert main(["serve", str(mdir), "--adapter", f"a={tmp_path}"]) == 2
    assert "neither adapter.safetensors" in capsys.readouterr().err
    from tests.serve_helpers import make_adapter
    make_adapter(make_model(model.config.vocab_size, d_model=32), tmp_path / "small", ["wq"], seed=0)
    assert main(["serve", str(mdir), "--adapter", f"a={tmp_path / 'small'}"]) == 2
    assert "tensor blocks.0.attn.wq.lora_A has shape (4, 32)" in capsys.readouterr().err
