import json

import pytest
from tests.retrieval_helpers import CORPUS, stdlib_docs, tiny_model, tiny_run_dir, tiny_tokenizer

from quark.chat import QuarkChat
from quark.config import ConfigError
from quark.retrieval import rag, store
from quark.retrieval.embed import QuarkEmbedder
from quark.retrieval.rag import (RAG, ExtractiveGenerator, LikelihoodReranker, ModelGenerator, answer_metrics,
                                 build_messages, parse_citations)
from quark.retrieval.store import Store


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(tok.get_vocab_size())


@pytest.fixture()
def st(tmp_path, tok, model):
    s = Store(tmp_path / "s", QuarkEmbedder(model, tok, name="tiny"), tok, chunk_tokens=32, chunk_overlap=8)
    s.upsert([{"id": k, "text": v, "source": f"notes/{k}.md"} for k, v in CORPUS.items()])
    yield s
    s.close()


def test_citations_and_prompt(st):
    assert parse_citations("See [2] and [1], again [2]; not [9] or [0].", 3) == [2, 1]
    hits = st.search("bake bread", k=3)
    msgs = build_messages("How is bread baked?", hits)
    assert msgs[0]["role"] == "system" and "[n]" in msgs[0]["content"]
    assert "[1] (notes/cooking.md)" in msgs[1]["content"] and msgs[1]["content"].endswith("Question: How is bread baked?")


def test_extractive_answer_cites_the_right_source(st):
    a = RAG(st, ExtractiveGenerator(), k=3).answer("How long should the dough rise before baking?")
    assert a.citations and a.cited_hits()[0].doc_id == "cooking"
    assert "rise for two hours" in a.text


def test_answer_metrics_count_an_answer_only_when_its_cited_source_holds_it(st):
    """A fact that lives in exactly one indexed document: an answer stating it counts as grounded only when
    it cites that document's passage; the same words citing another passage count as unsupported."""
    holding = [(c, doc) for c, doc, text in st.chunks() if "two hours" in text]
    assert {doc for _, doc in holding} == {"cooking"}
    qa = [{"question": "How long should the dough rise before baking?", "answer": "two hours",
           "gold": [c for c, _ in holding]}]

    def citing(right):
        def generate(messages):
            sources = messages[-1]["content"].split("\n\nQuestion:")[0].split("\n")[1:]
            n = next(i for i, line in enumerate(sources, 1) if ("two hours" in line) == right)
            return f"It should rise for two hours [{n}]."
        return generate
    good, rows = answer_metrics(RAG(st, citing(True), k=3), qa)
    assert good == {"n": 1, "answer_contains_answer": 1.0, "cites_gold_source": 1.0, "answer_contains_source": 1.0}
    assert rows[0]["cited_chunks"][0] in qa[0]["gold"]
    bad, _ = answer_metrics(RAG(st, citing(False), k=3), qa)
    assert bad == {"n": 1, "answer_contains_answer": 1.0, "cites_gold_source": 0.0, "answer_contains_source": 0.0}


def test_model_generation_and_reranking_run_end_to_end(st, tok, model):
    rr = LikelihoodReranker(model, tok)
    hits = st.search("graph index nearest neighbour", k=5)
    reranked = rr("graph index nearest neighbour", hits)
    assert sorted(h.chunk_id for h in reranked) == sorted(h.chunk_id for h in hits)
    s = rr.scores("graph index", hits)
    assert all(x < 0 for x in s)      # mean log-probabilities
    a = RAG(st, ModelGenerator(model, QuarkChat(tok), max_new_tokens=8), rr, k=2, candidates=5).answer("What is HNSW?")
    assert isinstance(a.text, str) and len(a.sources) == 2 and a.seconds > 0
    assert all(1 <= n <= 2 for n in a.citations)


def test_index_and_rag_steps(tmp_path):
    run = tiny_run_dir(tmp_path / "run")
    cfg = {"max_docs": 30, "max_chunks_per_doc": 4, "chunk_tokens": 64, "chunk_overlap": 16, "seed": 0}
    stats = store.run_step(run, cfg)
    assert stats["docs"] == 30 and stats["consistent"] and stats["chunks_total"] > 30
    again = store.run_step(run, cfg)                  # resume: nothing re-embedded
    assert again["unchanged"] == 30 and again["embedded"] == 0
    out = rag.run_step(run, {"n_questions": 15, "n_generate": 2, "k": 3, "max_new_tokens": 6, "seed": 0})
    m = json.loads((run / "rag" / "metrics.json").read_text())
    assert m["n_questions"] == out["n_questions"] == 15
    assert m["retrieval"]["bm25"]["recall@3"] >= 0.8       # the question copies most of its window
    assert m["retrieval"]["hybrid"]["recall@6"] >= m["retrieval"]["hybrid"]["recall@1"]
    # the best-overlapping retrieved sentence holds the blanked word and cites it; a random sentence rarely does
    assert m["extractive"]["answer_contains_source"] >= 0.5
    assert m["model"]["n"] == 2 and m["model"]["answer_contains_source"] <= m["model"]["answer_contains_answer"]
    assert len((run / "rag" / "qa.jsonl").read_text().splitlines()) == 15
    with pytest.raises(ConfigError, match="candidates"):
        rag.validate_config({"k": 5, "candidates": 2})
    with pytest.raises(ConfigError, match="index.embedder"):
        store.validate_config({"embedder": "bert"})


def test_index_and_rag_on_a_base_run_of_an_hf_model(tmp_path):
    """A run that starts from an HF checkpoint: the index embeds with its hidden states and its own
    tokenizer (mean of transformers' last hidden state), and RAG answers in its chat format."""
    import numpy as np
    import torch
    import transformers

    from quark.io import atomic_write_json
    from quark.rundir import RunDir
    from tests.hf_helpers import make_hf_model
    run = tmp_path / "run"
    (run / "dedup").mkdir(parents=True)
    (run / "dedup" / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in stdlib_docs(12)))
    hf = make_hf_model(tmp_path / "hf", max_position_embeddings=256)
    atomic_write_json(RunDir(run).state_path, {"steps": {}, "recipe": {"base_model": str(tmp_path / "hf")}})
    stats = store.run_step(run, {"max_docs": 12, "max_chunks_per_doc": 2, "chunk_tokens": 64, "chunk_overlap": 8})
    assert stats["docs"] == 12 and stats["consistent"]
    st = store.open_run_store(run)
    text = "Return a list of the words in the string."
    ids = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")(text, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        h = hf.model(**ids).last_hidden_state[0].mean(0).numpy()
    np.testing.assert_allclose(st.embedder.embed([text])[0], h / np.linalg.norm(h), rtol=1e-4, atol=1e-5)
    st.close()
    out = rag.run_step(run, {"n_questions": 2, "n_generate": 2, "k": 2, "max_new_tokens": 6, "seed": 0})
    assert out["n_questions"] == 2
    assert len((run / "rag" / "answers.jsonl").read_text().splitlines()) == 2
