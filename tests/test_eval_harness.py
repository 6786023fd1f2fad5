"""The eval step on a real run directory: a model trained for a few seconds on a structured corpus
must beat chance on the held-out continuation task by a stated margin (and the untrained one must
not), and every held-out window and document comes back as a per-item result for the gate."""
import json
import math
import random

import numpy as np
import pytest
import torch

from quark.eval.harness import EvalConfig, evaluate, resolve_tasks
from quark.model import GPT, GPTConfig
from quark.model.io import save_model
from tests.conftest import make_tokenizer
from tests.tiny_lm import one_thread  # noqa: F401 (one_thread is a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

SENTENCES = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog.",
             "Python is a programming language that lets you work quickly.", "import os\nprint(os.path.join('a', 'b'))\n",
             "Lists keep their items in order; sets do not.", "A dictionary maps keys to values."]


def corpus(n, seed):
    rng = random.Random(seed)
    return " ".join(rng.choice(SENTENCES) for _ in range(n))   # sentences in random order


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """run_dir/pack/val.bin from held-out text, and two models: trained on other text, and untrained."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("eval_run")
    tok = make_tokenizer(corpus=SENTENCES * 20)
    train = torch.tensor(tok.encode(corpus(600, 0)).ids)
    val = np.array(tok.encode(corpus(1000, 1)).ids, dtype=np.uint16)
    (root / "pack").mkdir()
    val.tofile(root / "pack" / "val.bin")
    (root / "pack" / "meta.json").write_text(json.dumps({"dtype": "uint16", "vocab_size": tok.get_vocab_size()}))
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=tok.get_vocab_size(), n_layer=2, n_head=2, n_kv_head=1, d_model=64, max_seq_len=96)
    dirs = {}
    for name, steps in (("untrained", 0), ("trained", 80)):
        model = GPT(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        gen = torch.Generator().manual_seed(0)
        for _ in range(steps):
            starts = torch.randint(0, len(train) - 65, (16,), generator=gen)
            x = torch.stack([train[s: s + 65] for s in starts])
            logits, _ = model(x[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
        dirs[name] = root / name
        save_model(model, dirs[name])
        tok.save(str(dirs[name] / "tokenizer.json"))
    return root, dirs, tok.get_vocab_size()


def test_trained_model_beats_chance_on_held_out_continuations(run):
    root, dirs, vocab = run
    cfg = EvalConfig(tasks=[], heldout_mc=40, max_tokens=20000)
    trained, items = evaluate(dirs["trained"], cfg, root, log=lambda *a: None)
    untrained, _ = evaluate(dirs["untrained"], cfg, root, log=lambda *a: None)
    assert trained["heldout_mc/n"] == 40 and trained["heldout_mc/chance"] == 0.25
    # 40 four-way questions: a guesser scores >= 0.45 with probability < 1% (binomial tail)
    assert trained["heldout_mc/acc"] >= 0.6
    assert untrained["heldout_mc/acc"] <= 0.45
    assert trained["heldout/loss"] < math.log(vocab) - 1.0 < untrained["heldout/loss"] + 1.0
    windows, n_tokens = items["heldout"], trained["heldout/tokens"]        # one item per 96-token window
    assert len(windows) == math.ceil(n_tokens / 96) and len({w["id"] for w in windows}) == len(windows)
    counts = [96] * (len(windows) - 1) + [n_tokens - 96 * (len(windows) - 1)]
    assert sum(w["loss"] * c for w, c in zip(windows, counts)) == pytest.approx(trained["heldout/loss"] * n_tokens, rel=1e-4)
    assert len(items["heldout_mc"]) == 40 and np.mean([i["acc"] for i in items["heldout_mc"]]) == trained["heldout_mc/acc"]


def test_resolve_tasks_names_public_benchmarks(tmp_path):
    (tmp_path / "test.jsonl").write_text(json.dumps({"question": "1 + 1?", "answer": "1 + 1 = 2\n#### 2"}) + "\n")
    ((spec, docs),) = resolve_tasks([f"gsm8k={tmp_path / 'test.jsonl'}"])
    assert spec.task == "gsm8k" and docs[0]["target"] == "2"
    assert [s.task for s, _ in resolve_tasks(["python_syntax"], limit=3)] == ["python_syntax"]
    assert len(resolve_tasks(["python_syntax"], limit=3)[0][1]) == 3
    with pytest.raises(ValueError, match="NAME=PATH of a public benchmark"):
        resolve_tasks(["squad=/x"])


def test_an_hf_model_is_scored_on_the_runs_text_in_its_own_tokens(tmp_path):
    """An HF checkpoint with its own vocabulary, evaluated in a run packed with Quark's tokenizer: the
    held-out loss is transformers' loss on the held-out documents encoded by the checkpoint's tokenizer."""
    import torch.nn.functional as F
    import transformers

    from quark.rundir import RunDir
    from tests.hf_helpers import make_hf_model, make_packed_run
    run, _ = make_packed_run(tmp_path)
    hf = make_hf_model(tmp_path / "hf", max_position_embeddings=256)
    metrics, items = evaluate(tmp_path / "hf", EvalConfig(max_tokens=200, heldout_mc=0, tasks=[]), run, log=lambda *a: None)
    ids = torch.from_numpy(RunDir(run).tokens("val", tmp_path / "hf", 200))[None]           # (1, 200)
    assert ids.max() < 320 and ids.shape[1] == 200
    text = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf").decode(ids[0])
    assert text.startswith(RunDir(run).tokenizer().decode(RunDir(run).tokens("val", None, 20).tolist()))  # the same text
    with torch.no_grad():
        expect = F.cross_entropy(hf(ids).logits[0, :-1], ids[0, 1:]).item()
    assert metrics["heldout/loss"] == pytest.approx(expect, rel=1e-4) and metrics["heldout/tokens"] == 199


def test_eval_step_on_a_sharded_hf_checkpoint(tmp_path):
    """The results' version is the content hash of every shard."""
    from quark.eval.harness import run_step
    from tests.hf_helpers import make_hf_model, make_packed_run
    run, _ = make_packed_run(tmp_path)
    hf = make_hf_model(tmp_path / "one", max_position_embeddings=128)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (tmp_path / "one" / name).exists():
            (tmp_path / "sharded" / name).write_bytes((tmp_path / "one" / name).read_bytes())
    cfg = {"model": str(tmp_path / "sharded"), "max_tokens": 100, "heldout_mc": 0, "tasks": []}
    sharded = run_step(run, cfg)
    one = run_step(run, {**cfg, "model": str(tmp_path / "one")})
    assert sharded["version"] != one["version"] and sharded["heldout/loss"] == pytest.approx(one["heldout/loss"], rel=1e-5)
