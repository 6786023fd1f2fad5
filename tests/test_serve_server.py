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
from tests.serve_helpers import ServerThread, free_port, make_model, make_model_dir, make_tokenizer, single_thread  # noqa: F401

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
    ("/v1/completions", {"prompt": "hi", "n": 3}, 400, "n", None),
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
    proc = subprocess.Popen([sys.executable, "-m", "quark.cli", "serve", str(mdir), "--port", str(port), "--max-batch", "2"],
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
