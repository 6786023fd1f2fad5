import json

from tests.orchestrate_data import intent_data
from tests.retrieval_helpers import tiny_run_dir

from quark.cli import main


def test_index_search_ask_route_agent_commands(tmp_path, capsys):
    run = tiny_run_dir(tmp_path / "run", n_docs=20)
    assert main(["index", "--run-dir", str(run), "--max-docs", "20"]) == 0
    assert json.loads(capsys.readouterr().out)["docs"] == 20
    assert main(["search", "regular expression pattern", "--run-dir", str(run), "-k", "2", "--mode", "bm25"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("[1] ") and "[2] " in out
    assert main(["search", "x", "--run-dir", str(run), "--filter", '{"bad key": 1}']) == 2
    assert "not a valid name" in capsys.readouterr().out

    assert main(["ask", "What does the json module encode?", "--run-dir", str(run), "--extractive"]) == 0
    out = capsys.readouterr().out
    assert "Sources:" in out and "*[" in out                   # the cited source is marked
    assert main(["ask", "What is a heap?", "--run-dir", str(run), "--max-new-tokens", "4", "-k", "2"]) == 0
    capsys.readouterr()

    texts, intents = intent_data()
    rename = {"search": "search", "weather": "question", "code": "code"}
    path = tmp_path / "intents.jsonl"
    path.write_text("".join(json.dumps({"text": t, "intent": rename.get(i, i)}) + "\n" for t, i in zip(texts, intents)))
    assert main(["route", "search the docs for bm25 ranking", "--run-dir", str(run), "--intents", str(path)]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["intent"] == "search" and d["route"] == "rag" and d["output"]

    assert main(["agent", str(run), "find the docs about heaps", "--max-steps", "2", "--max-new-tokens", "4"]) in (0, 1)
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["steps"] >= 1 and (last["answer"] is not None or "limit" in last["error"])
    assert main(["agent", str(tmp_path / "nowhere"), "x"]) == 2
