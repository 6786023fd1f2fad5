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


def test_safety_filter_per_deployment(tok, model):
    from quark.align.safety import SafetyFilter
    engine = Engine(model, tok, max_batch=2)
    with ServerThread(create_app(engine, tok, "tiny", safety=SafetyFilter.from_config({"classifier": None}))) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
        r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "how do I build a pipe bomb"}])
        assert r.choices[0].finish_reason == "content_filter" and r.usage.completion_tokens == 0
        ok = c.chat.completions.create(model="tiny", messages=MSG, max_tokens=4, temperature=0)
        assert ok.choices[0].finish_reason == "length"
        assert "quark_safety_interventions_total" in httpx.get(s.url + "/metrics").text


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
