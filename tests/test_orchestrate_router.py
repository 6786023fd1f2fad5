import time

import pytest
from tests.orchestrate_data import intent_data

from quark.orchestrate.intent import UNKNOWN, IntentClassifier
from quark.orchestrate.router import Route, Router
from quark.retrieval.embed import HashingEmbedder


@pytest.fixture(scope="module")
def clf():
    c = IntentClassifier(HashingEmbedder(dim=256))
    c.fit(*intent_data())
    return c


def failing(text):
    raise RuntimeError("model server down")


def slow(text):
    time.sleep(0.5)
    return "slow answer"


def test_routes_by_intent_quality_and_budget(clf):
    r = Router(clf, [Route("big-coder", lambda t: "big code", ["code"], cost=10, latency_ms=50, quality=2),
                     Route("small-coder", lambda t: "small code", ["code"], cost=1, latency_ms=20, quality=1),
                     Route("rag", lambda t: "rag answer", ["search"], cost=2, latency_ms=30),
                     Route("chat", lambda t: "chat answer", ["*"], cost=1, latency_ms=10),
                     Route("clarify", lambda t: "could you rephrase?", [UNKNOWN])])
    d = r.route("write a python function that sorts a list")
    assert (d.intent, d.route, d.output) == ("code", "big-coder", "big code") and d.confidence > 0.5
    assert r.route("write a python function that sorts a list", max_cost=5).route == "small-coder"
    assert r.route("search the docs for bm25 ranking").route == "rag"
    assert r.route("will it rain in Oslo tomorrow").route == "chat"          # no weather route: the "*" route
    assert r.route("order a pizza with olives and tickets").route in ("clarify", "chat")
    assert r.route("anything", intent=UNKNOWN).route == "clarify"
    over = r.route("write code that counts words", max_cost=0.5)
    assert over.over_budget and over.route == "small-coder"                # nothing fits: cheapest that serves
    r.close()


def test_fallback_on_failure_timeout_and_empty(clf):
    r = Router(clf, [Route("primary", failing, ["code"], quality=3, latency_ms=1),
                     Route("slowpoke", slow, ["code"], quality=2, latency_ms=1),
                     Route("empty", lambda t: "  ", ["code"], quality=1, latency_ms=1),
                     Route("backup", lambda t: "backup code", ["code"], quality=0, latency_ms=1)])
    d = r.route("fix this code so it parses json", max_latency_ms=200)
    assert d.route == "backup" and d.output == "backup code"
    assert [name for name, _ in d.tried] == ["primary", "slowpoke", "empty", "backup"]
    assert "RuntimeError" in d.tried[0][1] and "timed out" in d.tried[1][1] and d.tried[2][1] == "empty output"
    st = r.stats()
    assert st["primary"]["failures"] == 1 and st["slowpoke"]["latency_ms"] > 50   # learned: it is slow
    d2 = r.route("fix this code so it parses json", max_latency_ms=40)
    assert [n for n, _ in d2.tried] == ["primary", "empty", "backup"]          # slowpoke: now outside the budget
    with pytest.raises(ValueError, match="already registered"):
        r.add(Route("backup", print))
    r.close()
