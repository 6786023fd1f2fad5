"""`quark generate` and `quark chat` on real model and run directories."""
import io
import sys

from quark.chat import encode_chat
from quark.cli import main
from quark.infer.engine import Engine
from quark.infer.sampling import SamplingParams
from tests.serve_helpers import make_model_dir, single_thread  # noqa: F401


def test_generate_greedy_and_speculative(tmp_path, capsys):
    mdir, model, tok = make_model_dir(tmp_path / "run" / "pretrain" / "final")
    draft, _, _ = make_model_dir(tmp_path / "draft", seed=3, n_layer=1)
    eng = Engine(model, tok, max_batch=1)
    want = eng.generate(tok.encode("The quick").ids, SamplingParams(max_tokens=12, temperature=0)).text
    eng.shutdown()
    assert main(["generate", str(tmp_path / "run"), "--prompt", "The quick", "--max-tokens", "12", "--temperature", "0"]) == 0
    out = capsys.readouterr()
    assert out.out == want + "\n" and "12 generated" in out.err
    assert main(["generate", str(mdir), "--prompt", "The quick", "--max-tokens", "12", "--temperature", "0",
                 "--draft", str(draft), "--draft-k", "3"]) == 0
    out = capsys.readouterr()
    assert out.out == want + "\n" and "draft tokens accepted" in out.err


def test_generate_errors(tmp_path, capsys):
    assert main(["generate", str(tmp_path), "--prompt", "x"]) == 2
    assert "no trained model" in capsys.readouterr().err
    mdir, _, _ = make_model_dir(tmp_path / "m")
    assert main(["generate", str(mdir), "--prompt", "x", "--top-p", "0"]) == 2
    assert "top_p" in capsys.readouterr().err


def test_chat_repl(tmp_path, capsys, monkeypatch):
    mdir, model, tok = make_model_dir(tmp_path / "m")
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello world\n/reset\nHello world\n\n"))
    assert main(["chat", str(mdir), "--temperature", "0", "--max-tokens", "8"]) == 0
    out = capsys.readouterr().out
    ids, _ = encode_chat(tok, [{"role": "user", "content": "Hello world"}], add_generation_prompt=True)
    eng = Engine(model, tok, max_batch=1)
    want = eng.generate(ids, SamplingParams(max_tokens=8, temperature=0)).text
    eng.shutdown()
    assert out.count(f"assistant> {want}\n") == 2   # /reset: the second answer starts from scratch
