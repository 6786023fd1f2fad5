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
    for spec in (["--draft", str(draft), "--draft-k", "3"], ["--prompt-lookup"]):
        assert main(["generate", str(mdir), "--prompt", "The quick", "--max-tokens", "12", "--temperature", "0",
                     *spec]) == 0
        out = capsys.readouterr()
        assert out.out == want + "\n" and "proposed tokens accepted" in out.err
    assert main(["generate", str(mdir), "--prompt", "x", "--draft", str(draft), "--prompt-lookup"]) == 2
    assert "exclude each other" in capsys.readouterr().err


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


def test_generate_on_hf_directories_matches_transformers(tmp_path, capsys):
    """`quark generate DIR` on Hugging Face checkpoints: the checkpoint's chat template, 32 greedy
    tokens equal to transformers' generate (the engine runs biases, q/k norms, the sliding window past
    its width and dynamic rope past the original context), stopping at generation_config's eos ids."""
    import pytest
    import torch
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer

    from quark.chat import chat_format
    from quark.model.io import load_model
    from tests.hf_helpers import make_hf_model
    cases = {"llama": {}, "mistral": dict(sliding_window=12), "qwen2": {}, "qwen3": {},
             "llama-dynamic": dict(max_position_embeddings=16,
                                   rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 4.0})}
    for name, overrides in cases.items():
        d = tmp_path / name
        hf = make_hf_model(d, name.split("-")[0], **overrides)
        tok = Tokenizer.from_file(str(d / "tokenizer.json"))
        chat = chat_format(tok, d)
        ids, _ = chat.encode([{"role": "user", "content": "The quick brown fox"}], add_generation_prompt=True)
        prompt = torch.tensor([ids])
        new = hf.generate(prompt, max_new_tokens=32, do_sample=False, pad_token_id=0)[0, len(ids):].tolist()
        new = new[:next((i for i, t in enumerate(new) if t in chat.stop_ids), len(new))]   # stops at eos ids [2, 0]
        assert main(["generate", str(d), "--chat", "--prompt", "The quick brown fox", "--max-tokens", "32",
                     "--temperature", "0"]) == 0
        assert capsys.readouterr().out == tok.decode(new) + "\n", name
        model = load_model(d)
        # a fresh transformers model: its dynamic rope keeps the frequencies of the longest call so far
        hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        with torch.no_grad():   # eos ids off the argmax in both: all 32 tokens come out
            hf.lm_head.weight[[0, 2]] = 0
            model.lm_head.weight[[0, 2]] = 0
        theirs = hf.generate(prompt, max_new_tokens=32, do_sample=False, pad_token_id=0)[0, len(ids):]
        req = Engine(model, tok, max_batch=1, stop_ids=chat.stop_ids).generate(
            ids, SamplingParams(max_tokens=32, temperature=0))
        assert req.output_ids == theirs.tolist() and len(req.output_ids) == 32, name


def test_chat_repl_many_turns_in_a_small_context(tmp_path, capsys, monkeypatch):
    """Before, a 64-token context allowed one exchange, then the chat asked for /reset (and a default
    max_tokens of 256 never fit). Now each reply gets what fits and the oldest turns are dropped."""
    mdir, _, _ = make_model_dir(tmp_path / "m", max_seq_len=64)
    turns = [f"Hello world number {i}, tell me more" for i in range(8)]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(turns) + "\n\n"))
    assert main(["chat", str(mdir), "--system", "Be brief.", "--temperature", "0", "--seed", "1"]) == 0
    out = capsys.readouterr()
    assert out.out.count("assistant> ") == len(turns) and "[" not in out.err.split("\n", 1)[1]


def test_chat_fit_keeps_the_system_message_and_the_newest_turn(tmp_path):
    from quark.chat import chat_format
    from quark.serve.repl import fit
    mdir, _, tok = make_model_dir(tmp_path / "m")
    chat = chat_format(tok, mdir)
    msgs = [{"role": "system", "content": "Be brief."}]
    for i in range(6):
        msgs += [{"role": "user", "content": f"question {i} about the quick brown fox"},
                 {"role": "assistant", "content": f"answer {i} about the lazy dog"}]
    msgs.append({"role": "user", "content": "the newest question"})
    full, _ = chat.encode(msgs, add_generation_prompt=True)
    ids, kept = fit(chat, msgs, ctx=len(full))
    assert kept[0] == msgs[0] and kept[-1] == msgs[-1] and len(kept) < len(msgs)
    assert kept[1:] == msgs[len(msgs) - len(kept) + 1:]          # the newest turns, in order
    assert len(full) - len(ids) >= len(full) // 4 and ids == chat.encode(kept, add_generation_prompt=True)[0]
    assert fit(chat, msgs, ctx=10 * len(full))[1] == msgs        # what fits is left alone


def test_generate_stats_line_on_its_own_line_and_help_shows_defaults(tmp_path):
    """Before, with stdout and stderr in one pipe the stats line came out glued to the text."""
    import os
    import subprocess
    mdir, _, _ = make_model_dir(tmp_path / "m")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    env.pop("PYTHONUNBUFFERED", None)   # a user's shell: stdout into a pipe is block-buffered
    cmd = [sys.executable, "-m", "quark.cli", "generate", str(mdir), "--prompt", "The quick", "--max-tokens", "6",
           "--temperature", "0"]
    out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, check=True).stdout
    assert out.splitlines()[-1].startswith("[") and "6 generated" in out.splitlines()[-1]
    for name in ("generate", "chat"):
        help_ = subprocess.run([sys.executable, "-m", "quark.cli", name, "--help"], capture_output=True, text=True,
                               env=env, check=True).stdout
        assert "(default: 0.8)" in " ".join(help_.split())
