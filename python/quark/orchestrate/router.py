"""Router: send a request to one of the registered models / pipelines by intent, cost and latency
budget, falling back down the list when a route fails or overruns.

A Route serves some intents ("*" serves any, "unknown" the requests the classifier cannot place),
has a cost per call and an expected latency, and a quality rank. For a request the router
classifies the intent, keeps the routes that serve it and fit the budget (cost <= max_cost, expected
latency <= max_latency_ms), orders them best quality first (a route named for the intent before a "*"
one), then cheapest, and calls them in turn: a
route that raises, returns after its deadline or returns nothing hands over to the next. Expected
latency is learned online (exponential moving average of observed latencies), so a route that has
become slow drops out of tight budgets by itself. When no route fits the budget, the cheapest route
that serves the intent is tried rather than failing outright (reported as `over_budget`).
"""
import concurrent.futures as cf
import time
from dataclasses import dataclass, field

from quark.orchestrate.intent import UNKNOWN


@dataclass
class Route:
    name: str
    handler: object                       # handler(text) -> str (a model, a RAG pipeline, a tool chain ...)
    intents: list = field(default_factory=lambda: ["*"])
    cost: float = 0.0                     # per call, any unit shared by all routes (e.g. cents, FLOPs)
    latency_ms: float = 100.0             # expected; updated from observations
    quality: float = 0.0                  # larger is preferred
    calls: int = 0
    failures: int = 0

    def serves(self, intent):
        if intent == UNKNOWN:   # "*" routes take unknown requests only when no route claims them
            return UNKNOWN in self.intents
        return intent in self.intents or "*" in self.intents


@dataclass
class Decision:
    text: str
    intent: str
    confidence: float
    route: str = None                     # the route that answered (None: all failed)
    output: str = None
    tried: list = field(default_factory=list)   # [(route, "ok" | error)]
    over_budget: bool = False
    seconds: float = 0.0


class Router:
    def __init__(self, classifier=None, routes=(), ewma=0.3, max_workers=4):
        self.classifier = classifier
        self.routes = {}
        self.ewma = ewma
        self.pool = cf.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="route")
        for r in routes:
            self.add(r)

    def add(self, route):
        if route.name in self.routes:
            raise ValueError(f"route {route.name!r} is already registered")
        self.routes[route.name] = route
        return route

    def candidates(self, intent, max_cost=None, max_latency_ms=None):
        """Routes for `intent` in the order they will be tried -> (routes, over_budget)."""
        serving = [r for r in self.routes.values() if r.serves(intent)]
        if intent == UNKNOWN and not serving:
            serving = [r for r in self.routes.values() if "*" in r.intents]
        fit = [r for r in serving if (max_cost is None or r.cost <= max_cost)
               and (max_latency_ms is None or r.latency_ms <= max_latency_ms)]
        if fit:
            # Best quality first; at equal quality a route made for the intent beats a generalist ("*").
            return sorted(fit, key=lambda r: (-r.quality, "*" in r.intents, r.cost, r.latency_ms)), False
        return sorted(serving, key=lambda r: (r.cost, "*" in r.intents, r.latency_ms))[:1], True

    def classify(self, text):
        if self.classifier is None:
            return UNKNOWN, 0.0
        p = self.classifier.predict([text])[0]
        return p.intent, p.confidence

    def route(self, text, max_cost=None, max_latency_ms=None, intent=None):
        t0 = time.perf_counter()
        conf = 1.0
        if intent is None:
            intent, conf = self.classify(text)
        routes, over = self.candidates(intent, max_cost, max_latency_ms)
        d = Decision(text, intent, conf, over_budget=over)
        for r in routes:
            deadline = None if max_latency_ms is None else max_latency_ms / 1e3
            s = time.perf_counter()
            fut = self.pool.submit(r.handler, text)
            try:
                out = fut.result(timeout=deadline)
                err = None if isinstance(out, str) and out.strip() else "empty output"
            except cf.TimeoutError:
                out, err = None, f"timed out after {max_latency_ms} ms"   # the call finishes in the background
            except Exception as e:   # a failing route is a reason to fall back, not to fail the request
                out, err = None, f"{type(e).__name__}: {e}"
            ms = (time.perf_counter() - s) * 1e3
            r.calls += 1
            r.latency_ms = (1 - self.ewma) * r.latency_ms + self.ewma * ms
            if err is None:
                d.route, d.output = r.name, out
                d.tried.append((r.name, "ok"))
                break
            r.failures += 1
            d.tried.append((r.name, err))
        d.seconds = time.perf_counter() - t0
        return d

    def stats(self):
        return {n: {"calls": r.calls, "failures": r.failures, "latency_ms": round(r.latency_ms, 2), "cost": r.cost}
                for n, r in self.routes.items()}

    def close(self):
        self.pool.shutdown(wait=False, cancel_futures=True)


# ------------------------------------------------------------------------------ CLI `quark route`
def run_routes(run_dir, max_new_tokens=64):
    """The routes a run offers: RAG over its index for questions and searches, its chat model for the
    rest, and a clarifying reply for requests the classifier cannot place."""
    from quark.model.io import load_model
    from quark.retrieval.rag import RAG, ExtractiveGenerator, ModelGenerator
    from quark.retrieval.store import open_run_store
    from quark.rundir import RunDir
    store = open_run_store(run_dir)
    run_dir = RunDir.of(run_dir)
    model_dir = run_dir.model("latest")
    chat = ModelGenerator(load_model(model_dir), run_dir.chat(model_dir), max_new_tokens)
    rag = RAG(store, ExtractiveGenerator(), k=4)
    return [Route("rag", lambda t: rag.answer(t).text, ["question", "search"], cost=1.0, latency_ms=50.0, quality=1.0),
            Route("chat", lambda t: chat([{"role": "user", "content": t}]), ["*"], cost=5.0, latency_ms=2000.0),
            Route("clarify", lambda t: "I am not sure what you need. Could you rephrase?", [UNKNOWN], latency_ms=1.0)]


def configure_parser(parser):
    parser.add_argument("text", help="the request to route")
    parser.add_argument("--run-dir", required=True, help="run directory (index/ and a model)")
    parser.add_argument("--intents", required=True,
                        help='JSONL of {"text", "intent"} training examples (intent "unknown" = out of scope); '
                             'route names: question/search -> rag, anything else -> chat')
    parser.add_argument("--max-cost", type=float, default=None)
    parser.add_argument("--max-latency-ms", type=float, default=None)


def run_cli(args):
    import json

    from quark.io import read_jsonl
    from quark.orchestrate.intent import IntentClassifier
    from quark.retrieval.embed import HashingEmbedder
    try:
        rows = [rec for _, rec in read_jsonl(args.intents)]
        if not all(isinstance(r, dict) and isinstance(r.get("text"), str) and isinstance(r.get("intent"), str) for r in rows):
            raise ValueError(f"{args.intents}: every line needs string 'text' and 'intent'")
        clf = IntentClassifier(HashingEmbedder())
        report = clf.fit([r["text"] for r in rows], [r["intent"] for r in rows])
        router = Router(clf, run_routes(args.run_dir))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}")
        return 2
    d = router.route(args.text, args.max_cost, args.max_latency_ms)
    router.close()
    print(json.dumps({"intent": d.intent, "confidence": round(d.confidence, 4), "route": d.route, "output": d.output,
                      "tried": d.tried, "over_budget": d.over_budget, "seconds": round(d.seconds, 3),
                      "classifier": report}, indent=1))
    return 0 if d.route else 1
