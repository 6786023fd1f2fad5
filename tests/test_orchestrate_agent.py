import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest
from tests.retrieval_helpers import tiny_model, tiny_tokenizer

from quark.chat import QuarkChat
from quark.orchestrate.agent import Agent, Coordinator, LeaseLost, TaskBoard
from quark.retrieval.rag import ModelGenerator
from quark.retrieval.tools import ToolCall, ToolRegistry, parse_tool_call, register_http_api

FORECAST = {"Oslo": "snow", "Paris": "sun", "Lima": "fog"}


class Weather(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def do_GET(self):
        city = parse_qs(urlsplit(self.path).query)["city"][0]
        body = json.dumps({"city": city, "forecast": FORECAST.get(city, "unknown")}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def api():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Weather)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def weather_registry(api):
    reg = ToolRegistry()
    register_http_api(reg, "weather", "forecast for a city",
                      {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
                      api, path="/weather")
    return reg


def weather_policy(messages):
    """Rule-based policy: call the weather tool for the city in the task, then answer from the result."""
    last = messages[-1]
    if last["role"] == "tool":
        obs = json.loads(last["content"])
        return f"{obs['result']['city']}: {obs['result']['forecast']}" if "result" in obs else "failed: " + obs["error"]
    city = re.search(r"weather in (\w+)", last["content"]).group(1)
    return ToolCall("weather", {"city": city}).to_text()


def planner_policy(messages):
    """Split "compare weather in A and B" into two weather tasks and a summary that depends on them."""
    if messages[-1]["role"] == "tool":
        posted = [json.loads(m["content"])["result"]["id"] for m in messages if m["role"] == "tool"]
        if len(posted) < 3:
            if len(posted) == 2:
                return ToolCall("board_post", {"kind": "summary", "payload": "summarise the forecasts",
                                               "depends_on": posted}).to_text()
        else:
            return f"planned tasks {posted}"
    task = next(m["content"] for m in messages if m["role"] == "user")
    cities = re.findall(r"[A-Z][a-z]+", task.split("weather in", 1)[1])
    n_posted = sum(m["role"] == "tool" for m in messages)
    return ToolCall("board_post", {"kind": "weather", "payload": f"weather in {cities[n_posted]}"}).to_text()


def summary_policy(messages):
    found = re.findall(r"(\w+): (\w+)", messages[-1]["content"].split("Results of earlier tasks:", 1)[1])
    return "; ".join(f"{c} has {f}" for c, f in found if c in FORECAST)


def test_agent_loop_calls_the_http_tool(api):
    run = Agent("w", weather_policy, weather_registry(api)).run("what is the weather in Oslo?")
    assert run.answer == "Oslo: snow" and run.steps == 2 and run.tool_calls == 1 and run.error is None
    roles = [m["role"] for m in run.messages]
    assert roles == ["system", "user", "assistant", "tool", "assistant"]
    assert '"name": "weather"' in run.messages[0]["content"]


def test_agent_limits():
    reg = ToolRegistry()
    reg.register("noop", "does nothing", {"type": "object"}, lambda: "ok")
    looping = Agent("loop", lambda m: ToolCall("noop", {}).to_text(), reg, max_steps=3).run("go")
    assert looping.answer is None and "step limit" in looping.error and looping.steps == 3

    def slow(messages):
        time.sleep(0.15)
        return ToolCall("noop", {}).to_text()
    timed = Agent("slow", slow, reg, max_steps=100, max_seconds=0.3).run("go")
    assert "time limit" in timed.error and timed.steps < 100
    bad = Agent("bad", lambda m: '{"tool": "nope", "arguments": {}}' if len(m) < 3 else "gave up", reg).run("go")
    assert bad.answer == "gave up" and "unknown tool" in bad.messages[3]["content"]


def test_board_claims_each_task_once_across_threads(tmp_path):
    board = TaskBoard(tmp_path / "board.sqlite")
    ids = [board.post("job", f"t{i}") for i in range(60)]
    taken, lock = [], threading.Lock()

    def worker(name):
        while (t := board.claim(name)) is not None:
            with lock:
                taken.append(t.id)
            board.finish(t.id, name, result=name)

    threads = [threading.Thread(target=worker, args=(f"a{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(taken) == ids and board.counts()["done"] == 60
    with pytest.raises(ValueError, match="unknown tasks"):
        board.post("job", "x", depends_on=[999])
    a = board.post("job", "fails")
    b = board.post("job", "after", depends_on=[a])
    board.finish(board.claim("x").id, "x", error="boom")
    assert board.claim("x") is None and board.get(b).status == "failed"


def test_task_of_a_killed_worker_is_taken_over_after_its_lease(tmp_path):
    path = tmp_path / "board.sqlite"
    board = TaskBoard(path)
    task_id = board.post("job", "x")
    code = ("import sys, time; from quark.orchestrate.agent import TaskBoard\n"
            "t = TaskBoard(sys.argv[1]).claim('doomed', lease_s=1.5)\n"
            "print(t.id, flush=True); time.sleep(600)\n")
    worker = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert int(worker.stdout.readline()) == task_id
        t0 = time.monotonic()
        os.kill(worker.pid, signal.SIGKILL)
    finally:
        worker.kill()
        worker.wait()
    assert board.claim("b") is None and board.get(task_id).owner == "doomed"   # the lease still holds
    while (t := board.claim("b")) is None:
        assert time.monotonic() - t0 < 10
        time.sleep(0.05)
    assert t.id == task_id and t.owner == "b"
    with pytest.raises(LeaseLost, match="not held by 'doomed'"):
        board.finish(task_id, "doomed", result="late")   # a worker that lost its lease cannot overwrite
    board.finish(task_id, "b", result="ok")
    assert board.get(task_id).status == "done" and board.get(task_id).result == "ok"
    with pytest.raises(LeaseLost):
        board.finish(task_id, "b", result="twice")


def test_finish_checks_the_owner_and_a_task_that_kills_its_workers_fails(tmp_path):
    board = TaskBoard(tmp_path / "board.sqlite", max_claims=2)
    a = board.post("job", "a")
    assert board.claim("w1").id == a
    with pytest.raises(LeaseLost, match="owner 'w1'"):
        board.finish(a, "w2", result="not mine")
    assert board.get(a).status == "running"
    poison = board.post("job", "poison")
    board.finish(a, "w1", result="ok")
    for _ in range(2):
        assert board.claim("w", lease_s=0.01).id == poison
        time.sleep(0.05)
    assert board.claim("w") is None
    assert board.get(poison).status == "failed" and "lease expired 2 times" in board.get(poison).error


def test_coordinator_planner_workers_summary(tmp_path, api):
    board = TaskBoard(tmp_path / "board.sqlite")
    reg = board.board_tools(ToolRegistry())
    agents = [Agent("planner", planner_policy, reg, kinds=["trip"]),
              Agent("w1", weather_policy, weather_registry(api), kinds=["weather"]),
              Agent("w2", weather_policy, weather_registry(api), kinds=["weather"]),
              Agent("writer", summary_policy, kinds=["summary"])]
    root = board.post("trip", "compare the weather in Oslo and Paris")
    out = Coordinator(board, agents).run(max_seconds=30)
    assert out["counts"] == {"todo": 0, "running": 0, "done": 4, "failed": 0}
    tasks = board.list()
    assert board.get(root).result.startswith("planned tasks")
    summary = next(t for t in tasks if t.kind == "summary")
    assert summary.result == "Oslo has snow; Paris has sun"
    assert {e["agent"] for e in out["log"] if e["kind"] == "weather"} <= {"w1", "w2"}


def test_model_policy_runs_within_limits():
    tok = tiny_tokenizer()
    gen = ModelGenerator(tiny_model(tok.get_vocab_size()), QuarkChat(tok), max_new_tokens=8)
    run = Agent("lm", gen, max_steps=2).run("hello")
    assert run.steps >= 1 and (run.answer is not None or "limit" in run.error)


def test_agent_cli_runs_an_hf_model_as_the_policy(tmp_path):
    """`quark agent DIR TASK` on a Hugging Face checkpoint: the policy speaks its chat template."""
    from tests.hf_helpers import make_hf_model
    make_hf_model(tmp_path / "hf", max_position_embeddings=256)
    r = subprocess.run([sys.executable, "-m", "quark.cli", "agent", str(tmp_path / "hf"), "say hello", "--max-steps", "1",
                        "--max-new-tokens", "4"], capture_output=True, text=True, timeout=300)
    assert r.returncode in (0, 1), r.stdout[-2000:] + r.stderr[-2000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["steps"] == 1 and (result["answer"] is not None or "limit" in result["error"])


# ---------------------------------------------------------------- the run's own SFT model through a real tool
def atlas(n=300, seed=0):
    """Made-up countries and their capitals: facts no model brings along, one token each under the run's
    tokenizer (trained on the atlas below)."""
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ru", "te", "vo", "zan", "bel", "dor", "fi", "gus", "hal", "jen", "mur", "nov", "pax"]
    names = []
    while len(names) < 2 * n:
        name = "".join(rng.choice(syllables) for _ in range(3)).capitalize()
        if name not in names:
            names.append(name)
    return names[:n], names[n:]


@pytest.fixture(scope="module")
def tool_run(tmp_path_factory):
    """A run directory taken through the steps a run takes: an atlas page in clean/docs.jsonl, the instruct
    step (its search_docs records: topic question -> call -> the passage -> answer), and the sft step on a
    tiny random model (seeded)."""
    from quark.chat import tools_prompt
    from quark.model.io import save_model
    from quark.tune import instruct, sft
    from tests.tiny_lm import tiny_model as lm
    from tests.tiny_lm import tiny_tokenizer as lm_tokenizer
    from tests.tiny_lm import write_jsonl
    run = tmp_path_factory.mktemp("tool_run") / "run"
    countries, capitals = atlas()
    page = "\n\n".join(f"{c}\n\n{c}'s capital is {k}; the city lies by the sea." for c, k in zip(countries, capitals))
    write_jsonl(run / "clean" / "docs.jsonl", [{"id": "atlas", "text": page, "source": "atlas", "meta": {"title": "Atlas"}}])
    observation = {"tool": "search_docs", "result": [{"doc": "atlas", "text": "x"}]}   # its keys become tokens too
    tok = lm_tokenizer(extra=[page] * 3 + [tools_prompt(instruct.TOOLS)] * 20
                       + [json.dumps({"query": c} | observation) for c in countries], vocab_size=2000)
    (run / "tokenizer").mkdir(parents=True)
    tok.save(str(run / "tokenizer" / "tokenizer.json"))
    save_model(lm(tok.get_vocab_size(), max_seq_len=256), run / "pretrain" / "final")
    stats = instruct.run_step(run, {"seed": 0, "tool_examples": len(countries), "safety_examples": 0, "calculator_examples": 0})
    assert stats["tool_records"] > 200
    sft.run_step(run, {"seed": 0, "steps": 300, "lr": 3e-3, "batch_size": 16, "warmup": 20})
    return run, tok, countries, capitals


@pytest.mark.slow
def test_the_runs_sft_model_calls_search_docs_through_the_agent(tool_run, tmp_path):
    """The policy is the run's sft model (quark agent's ModelGenerator, greedy): asked about a country, it
    answers with a search_docs call in the chat template's syntax, which the agent parses, validates against
    the tool's schema and runs against a real index (SQLite FTS5 + vectors); the passage comes back as the
    tool message and the model answers after it. The untrained model it started from emits no call."""
    from quark.model.io import load_model
    from quark.retrieval.embed import QuarkEmbedder
    from quark.retrieval.store import Store
    from quark.retrieval.tools import builtin_tools, store_search
    run, tok, countries, capitals = tool_run
    model = load_model(run / "sft" / "final")
    store = Store(tmp_path / "index", QuarkEmbedder(model, tok, name="sft"), tok, chunk_tokens=64, chunk_overlap=0)
    store.upsert([{"id": c, "text": f"{c}'s capital is {k}; the city lies by the sea.", "source": "atlas"}
                  for c, k in zip(countries, capitals)])
    tools = builtin_tools(store_search(store))

    def ask(model, country):
        return Agent("atlas", ModelGenerator(model, QuarkChat(tok), max_new_tokens=40), tools, max_steps=3).run(
            f'Tell me about "{country}".')

    for country in countries[:10]:
        r = ask(model, country)
        call = parse_tool_call(r.messages[2]["content"])
        assert call is not None and call.tool == "search_docs" and set(call.arguments) == {"query"}, r.messages[2:]
        observation = json.loads(r.messages[3]["content"])
        assert r.messages[3]["role"] == "tool" and "error" not in observation, observation
        hit = observation["result"][0]
        assert hit["text"] in store.get_document(hit["doc"])["chunks"]   # the index's passage, as the tool returned it
        assert r.tool_calls >= 1 and r.steps >= 2
    untrained = [ask(load_model(run / "pretrain" / "final"), c) for c in countries[:3]]
    assert not any(parse_tool_call(r.messages[2]["content"]) for r in untrained)
    store.close()
