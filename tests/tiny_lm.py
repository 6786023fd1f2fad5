"""Tiny tokenizer, tiny model and a tiny run directory for the fine-tuning and alignment tests."""
import inspect
import json
import textwrap

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from quark.chat import SPECIAL_TOKENS
from quark.model import GPT, preset
from quark.model.io import save_model

SENTENCES = [
    "hello world, how are you? fine thanks", "the quick brown fox jumps over the lazy dog",
    "def add(a, b): return a + b", "Return the sum of two numbers.", "I'm sorry, but I can't help with that request.",
    "Python is a programming language. Lists hold items in order.", "yes this is correct", "no that is wrong",
]


def tiny_tokenizer(extra=(), vocab_size=400):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(SENTENCES) * 10 + list(extra), trainer)
    return tok


def tiny_model(vocab_size, seed=0, **over):
    torch.manual_seed(seed)
    cfg = preset("nano", vocab_size=vocab_size, n_layer=2, d_model=64, n_head=4, n_kv_head=2, max_seq_len=128)
    for k, v in over.items():
        setattr(cfg, k, v)
    return GPT(cfg)


def chat_record(user, answer, system=None):
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user},
                                                                           {"role": "assistant", "content": answer}]
    return {"messages": msgs}


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def code_corpus():
    """Real Python sources from the standard library (what the scrape step collects)."""
    import json as json_mod
    import textwrap as tw
    return [{"path": inspect.getsourcefile(m), "repo": "cpython", "language": "python", "license": "PSF",
             "text": inspect.getsource(m)} for m in (tw, json_mod.encoder)]


DOC = textwrap.dedent("""\
    Lists

    Lists are mutable sequences, typically used to store collections of homogeneous items.

    Tuples

    Tuples are immutable sequences, typically used to store collections of heterogeneous data.

    Dictionaries

    A mapping object maps hashable values to arbitrary objects. Mappings are mutable objects.
    """)


def make_run(tmp_path, with_model=True, seed=0):
    """A run directory with the outputs the fine-tuning steps read: scrape/, clean/, tokenizer/,
    pretrain/final."""
    run = tmp_path / "run"
    code = code_corpus()
    write_jsonl(run / "scrape" / "files-00000.jsonl", code)
    write_jsonl(run / "clean" / "docs.jsonl", [{"id": "d1", "text": DOC, "source": "pydoc", "meta": {"title": "Built-in Types"}}])
    tok = tiny_tokenizer(extra=[c["text"] for c in code] + [DOC], vocab_size=600)
    (run / "tokenizer").mkdir(parents=True)
    tok.save(str(run / "tokenizer" / "tokenizer.json"))
    if with_model:
        save_model(tiny_model(tok.get_vocab_size(), seed=seed, max_seq_len=256), run / "pretrain" / "final")
    return run, tok


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread: at these sizes intra-op threads only add synchronisation,
    which becomes severe when the cores are shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
