"""Retrieval-augmented generation: retrieve -> (re-rank) -> prompt with numbered sources -> generate an
answer that cites them as [n]; plus the evaluation behind the pipeline step `rag`.

Re-ranking is query likelihood (UPR, Sachan et al. 2022): a candidate passage scores the mean
log-probability the language model gives the question after reading it. It needs no extra model
and uses the run's own LM; it costs one forward pass per candidate.

Generators: ModelGenerator (the run's chat model through the shared chat template) or
ExtractiveGenerator (the retrieved sentence that best overlaps the question, cited) — the second is
a model-free baseline that shows what the retrieval alone supports.

Evaluation (`quark run` step `rag`): a QA set generated from the indexed chunks (fill-in-the-blank
questions: a sentence window of a sampled chunk with one content word blanked, answer = that word,
gold = every chunk holding the window), retrieval recall@k and MRR for BM25, dense and hybrid, and for
generated answers: contains the answer, cites a gold source, and `answer_contains_source` (contains
the answer and cites a source that holds it) -> run_dir/rag/metrics.json and qa.jsonl.
"""
import json
import random
import re
import time
from dataclasses import asdict, dataclass, field

import torch

from quark.config import ConfigError, Step, from_dict
from quark.infer.engine import Engine
from quark.infer.sampling import SamplingParams
from quark.io import atomic_write_json, atomic_write_text
from quark.rundir import RunDir

SYSTEM = ("Answer the question using only the numbered sources. Cite each source you use as [n]. "
          "If the sources do not contain the answer, say so.")
_CITE = re.compile(r"\[(\d+)\]")
_WORDS = re.compile(r"[A-Za-z][A-Za-z_]+")
_SENT = re.compile(r"[^.!?\n]+[.!?]?")
STOPWORDS = frozenset("""the and for are but not you all any can had her was one our out day get has him his how
man new now old see two way who boy did its let put say she too use with that this from they will would there
their what about which when make like time just know take into year your good some could them than then look
only come over think also back after work first well even want because these give most been were have more
other such where while should each those being many must much very same does here""".split())


@dataclass
class Answer:
    question: str
    text: str
    sources: list                  # [Hit], numbered 1.. in the prompt
    citations: list = field(default_factory=list)   # valid [n] cited in text, in order of first use
    seconds: float = 0.0

    def cited_hits(self):
        return [self.sources[n - 1] for n in self.citations]


def parse_citations(text, n_sources):
    seen = []
    for m in _CITE.finditer(text):
        n = int(m.group(1))
        if 1 <= n <= n_sources and n not in seen:
            seen.append(n)
    return seen


def build_messages(question, hits, max_chars_per_source=600):
    lines = []
    for n, h in enumerate(hits, 1):
        origin = f" ({h.source})" if h.source else ""
        lines.append(f"[{n}]{origin} {h.text[:max_chars_per_source]}")
    user = "Sources:\n" + "\n".join(lines) + f"\n\nQuestion: {question}"
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


class ModelGenerator:
    """Chat generation through the engine, greedy (or sampled), in the model's chat format (quark.chat,
    RunDir.chat(model_dir): Quark's template, or an HF checkpoint's own) and stopping at its stop ids."""

    def __init__(self, model, chat, max_new_tokens=64, temperature=0.0, seed=0):
        self.model, self.chat, self.tokenizer = model.eval(), chat, chat.tokenizer
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.rng = random.Random(seed)   # one seed per answer: a sequence of answers is reproducible
        self.engine = Engine(model, max_batch=1, stop_ids=chat.stop_ids)

    def __call__(self, messages):
        ids, _ = self.chat.encode(messages, add_generation_prompt=True)
        room = self.model.config.max_seq_len - self.max_new_tokens
        if len(ids) > room:   # keep the start (system, first sources) and the end (the question)
            ids = ids[: room // 2] + ids[len(ids) - (room - room // 2):]
        params = SamplingParams(max_tokens=self.max_new_tokens, temperature=self.temperature,
                                seed=self.rng.randrange(2**31))
        out = self.engine.run([ids], params)[0].output_ids
        return self.tokenizer.decode(out, skip_special_tokens=True).strip()


class ExtractiveGenerator:
    """The source sentence sharing the most question words, with its citation."""

    def __call__(self, messages, hits=None):
        question = messages[-1]["content"].rsplit("Question:", 1)[-1]
        q = {w.lower() for w in _WORDS.findall(question)} - STOPWORDS
        best, best_n, best_score = "", 0, 0
        for n, h in enumerate(hits or [], 1):
            for s in _SENT.findall(h.text):
                score = len(q & {w.lower() for w in _WORDS.findall(s)})
                if score > best_score:
                    best, best_n, best_score = s.strip(), n, score
        return f"{best} [{best_n}]" if best_n else "The sources do not contain the answer."


class LikelihoodReranker:
    """Re-rank hits by mean log p(question | passage) under the LM (UPR)."""

    def __init__(self, model, tokenizer, max_passage_tokens=160):
        self.model, self.tokenizer, self.max_passage_tokens = model.eval(), tokenizer, max_passage_tokens

    @torch.no_grad()
    def scores(self, question, hits):
        q = self.tokenizer.encode("\nQuestion: " + question, add_special_tokens=False).ids
        q = q[: self.model.config.max_seq_len // 2]
        out = []
        for h in hits:
            p = self.tokenizer.encode("Passage: " + h.text, add_special_tokens=False).ids
            p = p[: min(self.max_passage_tokens, self.model.config.max_seq_len - len(q))]
            ids = torch.tensor([p + q])
            logits, _ = self.model(ids)                                           # (1, T, V)
            logp = torch.log_softmax(logits[0, len(p) - 1:-1].float(), -1)        # predicts the question tokens
            out.append(float(logp.gather(1, torch.tensor(q)[:, None]).mean()))
        return out

    def __call__(self, question, hits):
        s = self.scores(question, hits)
        return [h for _, h in sorted(zip(s, hits), key=lambda t: -t[0])]


class RAG:
    def __init__(self, store, generator=None, reranker=None, k=4, candidates=20, mode="hybrid"):
        self.store, self.generator, self.reranker = store, generator or ExtractiveGenerator(), reranker
        self.k, self.candidates, self.mode = k, candidates, mode

    def retrieve(self, question, filter=None, query_vec=None):
        hits = self.store.search(question, k=self.candidates if self.reranker else self.k, mode=self.mode,
                                 filter=filter, query_vec=query_vec)
        return self.reranker(question, hits)[: self.k] if self.reranker else hits

    def answer(self, question, filter=None, query_vec=None):
        t0 = time.perf_counter()
        hits = self.retrieve(question, filter, query_vec)
        messages = build_messages(question, hits)
        if isinstance(self.generator, ExtractiveGenerator):
            text = self.generator(messages, hits)
        else:
            text = self.generator(messages)
        return Answer(question, text, hits, parse_citations(text, len(hits)), time.perf_counter() - t0)


# ------------------------------------------------------------------------------ evaluation
def make_qa(store, n, seed=0, window_words=14):
    """Fill-in-the-blank questions from sampled chunks -> [{"question", "answer", "window", "gold"}]."""
    rng = random.Random(seed)
    rows = list(store.chunks())
    flat = [(c, " ".join(t.split())) for c, _, t in rows]   # whitespace-normalised, to find every gold copy
    rng.shuffle(rows)
    qa = []
    for cid, doc_id, text in rows:
        if len(qa) >= n:
            break
        words = text.split()
        if len(words) < window_words:
            continue
        s = rng.randrange(0, len(words) - window_words + 1)
        win = words[s:s + window_words]
        cands = [i for i, w in enumerate(win) if _WORDS.fullmatch(w.strip(".,;:()\"'")) and len(w) >= 5
                 and w.lower().strip(".,;:()\"'") not in STOPWORDS]
        if not cands:
            continue
        i = max(cands, key=lambda i: (len(win[i]), -i))
        answer = win[i].strip(".,;:()\"'")
        question = "Fill in the blank: " + " ".join(win[:i] + ["____"] + win[i + 1:])
        window = " ".join(win)
        gold = [c for c, t in flat if window in t]
        qa.append({"question": question, "answer": answer, "window": window, "gold": gold,
                   "doc_id": doc_id})
    return qa


def retrieval_metrics(store, qa, ks=(1, 5, 10), modes=("bm25", "dense", "hybrid")):
    out = {}
    kmax = max(ks)
    t0 = time.perf_counter()
    vecs = store.embedder.embed([q["question"] for q in qa])   # once, batched, for every mode
    embed_ms = 1e3 * (time.perf_counter() - t0) / max(1, len(qa))
    for mode in modes:
        hits_at = {k: 0 for k in ks}
        rr, t0 = 0.0, time.perf_counter()
        for q, v in zip(qa, vecs):
            ids = [h.chunk_id for h in store.search(q["question"], k=kmax, mode=mode, query_vec=v)]
            gold = set(q["gold"])
            rank = next((r for r, c in enumerate(ids, 1) if c in gold), None)
            for k in ks:
                hits_at[k] += rank is not None and rank <= k
            rr += 1.0 / rank if rank else 0.0
        n = max(1, len(qa))
        out[mode] = {**{f"recall@{k}": round(v / n, 4) for k, v in hits_at.items()}, f"mrr@{kmax}": round(rr / n, 4),
                     "ms_per_query": round(1e3 * (time.perf_counter() - t0) / n + (embed_ms if mode != "bm25" else 0), 2)}
    return out


def answer_metrics(rag, qa, query_vecs=None):
    rows, contains, cites_gold, grounded = [], 0, 0, 0
    for i, q in enumerate(qa):
        a = rag.answer(q["question"], query_vec=None if query_vecs is None else query_vecs[i])
        ans = q["answer"].lower()
        has = ans in a.text.lower()
        gold = set(q["gold"])
        cited = a.cited_hits()
        c_gold = any(h.chunk_id in gold for h in cited)
        c_holds = any(ans in h.text.lower() for h in cited)
        contains += has
        cites_gold += c_gold
        grounded += has and c_holds
        rows.append({"question": q["question"], "expected": q["answer"], "answer": a.text, "citations": a.citations,
                     "cited_chunks": [h.chunk_id for h in cited], "gold": q["gold"], "seconds": round(a.seconds, 3)})
    n = max(1, len(qa))
    return {"n": len(qa), "answer_contains_answer": round(contains / n, 4), "cites_gold_source": round(cites_gold / n, 4),
            "answer_contains_source": round(grounded / n, 4)}, rows


# ------------------------------------------------------------------------- pipeline step `rag`
@dataclass
class RagConfig:
    n_questions: int = 100        # generated QA pairs for retrieval recall
    n_generate: int = 10          # of those, answered by the run's model (CPU generation is slow)
    k: int = 5                    # sources per prompt
    candidates: int = 20          # hybrid candidates before re-ranking
    rerank: bool = False          # query-likelihood re-ranking with the run's model
    max_new_tokens: int = 48
    seed: int = 0


def validate_config(cfg):
    c = from_dict(RagConfig, cfg, "rag")
    if c.n_questions < 1 or c.k < 1 or c.candidates < c.k or c.n_generate < 0 or c.max_new_tokens < 1:
        raise ConfigError("rag: need n_questions >= 1, k >= 1, candidates >= k, n_generate >= 0, max_new_tokens >= 1")
    return c


def run_step(run_dir, cfg):
    from quark.model.io import load_model
    from quark.retrieval.store import open_run_store
    c = validate_config(cfg)
    run_dir = RunDir.of(run_dir)
    out = run_dir.output("rag")
    store = open_run_store(run_dir)
    t0 = time.time()
    qa = make_qa(store, c.n_questions, c.seed)
    if not qa:
        raise ValueError(f"{run_dir.root / 'index'} holds no chunk long enough to make a question; index more documents")
    atomic_write_text(out / "qa.jsonl", "".join(json.dumps(q) + "\n" for q in qa))
    metrics = {"n_questions": len(qa), "retrieval": retrieval_metrics(store, qa, ks=(1, c.k, 2 * c.k))}
    model_dir = run_dir.model("latest")
    model, chat = load_model(model_dir), run_dir.chat(model_dir)   # the model's own tokenizer and chat format
    reranker = LikelihoodReranker(model, chat.tokenizer) if c.rerank else None
    extractive = RAG(store, ExtractiveGenerator(), reranker, c.k, c.candidates)
    vecs = store.embedder.embed([q["question"] for q in qa])
    metrics["extractive"], _ = answer_metrics(extractive, qa, vecs)
    if c.n_generate:
        generated = RAG(store, ModelGenerator(model, chat, c.max_new_tokens, seed=c.seed), reranker, c.k, c.candidates)
        metrics["model"], rows = answer_metrics(generated, qa[: c.n_generate], vecs)
        atomic_write_text(out / "answers.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    metrics["settings"] = asdict(c)
    metrics["seconds"] = round(time.time() - t0, 2)
    atomic_write_json(out / "metrics.json", metrics)
    store.close()
    r = metrics["retrieval"]
    return {"n_questions": len(qa), **{f"{m}_recall@{c.k}": r[m][f"recall@{c.k}"] for m in r},
            "model_answer_contains_source": metrics.get("model", {}).get("answer_contains_source"),
            "seconds": metrics["seconds"]}


STEP = Step(name="rag", config=RagConfig, run=run_step, check=validate_config)


# ------------------------------------------------------------------------------ tool `quark ask`
def configure_parser(parser):
    parser.add_argument("question", help="question to answer from the run's index")
    parser.add_argument("--run-dir", default="runs/default", help="run directory with index/ and a model")
    parser.add_argument("-k", type=int, default=4, help="sources in the prompt")
    parser.add_argument("--extractive", action="store_true", help="answer with the best source sentence (no model)")
    parser.add_argument("--rerank", action="store_true", help="query-likelihood re-ranking with the run's model")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--filter", default=None, help="metadata filter as JSON")


def run_cli(args):
    from quark.model.io import load_model
    from quark.retrieval.store import open_run_store
    try:
        store = open_run_store(args.run_dir)
        run_dir = RunDir(args.run_dir)
        model_dir = run_dir.model("latest") if not args.extractive or args.rerank else None
        model = load_model(model_dir) if model_dir else None
        gen = ExtractiveGenerator() if args.extractive else \
            ModelGenerator(model, run_dir.chat(model_dir), args.max_new_tokens)
        rr = LikelihoodReranker(model, run_dir.chat(model_dir).tokenizer) if args.rerank else None
        a = RAG(store, gen, rr, k=args.k).answer(args.question, json.loads(args.filter) if args.filter else None)
    except (FileNotFoundError, ValueError, ConfigError) as e:
        print(f"error: {e}")
        return 2
    print(a.text)
    print("\nSources:")
    for n, h in enumerate(a.sources, 1):
        mark = "*" if n in a.citations else " "
        print(f"{mark}[{n}] {h.doc_id} ({h.source}): {' '.join(h.text.split())[:160]}")
    store.close()
    return 0
