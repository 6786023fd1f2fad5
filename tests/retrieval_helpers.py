"""Shared fixtures of the retrieval / orchestration tests: a tiny byte-level BPE tokenizer with the chat
special tokens, a tiny random Quark model, and a small corpus of distinct topics."""
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from quark.chat import SPECIAL_TOKENS
from quark.model import GPT, GPTConfig
from quark.model.io import save_model

CORPUS = {
    "sqlite": "SQLite is an embedded database engine. It stores a whole database in one file and supports "
              "transactions with a write-ahead log. FTS5 adds full-text search with BM25 ranking.",
    "hnsw": "HNSW is a graph index for approximate nearest neighbour search. Each vector links to close "
            "neighbours on several layers, and a greedy walk from the top layer finds the nearest points.",
    "tokenizer": "A byte-level BPE tokenizer merges frequent pairs of bytes into new tokens. Special tokens "
                 "mark roles in the chat template, and offsets map tokens back to characters.",
    "python": "Python lists are dynamic arrays. Appending is amortised constant time, while inserting at "
              "the front moves every element. Dictionaries are hash tables keyed by hashable objects.",
    "weather": "The weather tomorrow brings rain in the morning and sunshine in the afternoon, with a cold "
               "wind from the north and temperatures around twelve degrees.",
    "cooking": "To bake bread, mix flour, water, salt and yeast, knead the dough, let it rise for two hours, "
               "shape the loaf and bake it in a hot oven until the crust is brown.",
}


def tiny_tokenizer(vocab_size=400):
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(CORPUS.values()) * 3, trainer)
    return tok


def tiny_model(vocab_size, seed=0, d_model=32, max_seq_len=256):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab_size, n_layer=1, n_head=2, n_kv_head=1, d_model=d_model,
                         max_seq_len=max_seq_len))


def tiny_model_dir(path, seed=0):
    """A model directory (model.safetensors, config.json, tokenizer.json) with a tiny random model."""
    tok = tiny_tokenizer()
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    save_model(tiny_model(tok.get_vocab_size(), seed), path, tokenizer_path=path / "tokenizer.json")
    return path


def stdlib_docs(n=40):
    """Real offline text: docstrings of standard-library modules and their public functions."""
    import importlib
    docs = []
    for name in ("json", "re", "os", "random", "string", "textwrap", "heapq", "bisect", "statistics", "csv",
                 "fractions", "decimal", "difflib", "shutil", "tempfile", "functools", "itertools", "collections"):
        mod = importlib.import_module(name)
        for attr in [None, *sorted(dir(mod))]:
            obj = mod if attr is None else getattr(mod, attr)
            doc = getattr(obj, "__doc__", None)
            if attr and attr.startswith("_") or not isinstance(doc, str) or len(doc.split()) < 30:
                continue
            docs.append({"id": f"{name}.{attr}" if attr else name, "text": doc, "source": name,
                         "meta": {"module": name, "kind": "module" if attr is None else "member"}})
            if len(docs) >= n:
                return docs
    return docs


def tiny_run_dir(path, n_docs=40):
    """A run directory as the earlier steps leave it: tokenizer/, pretrain/final/, dedup/docs.jsonl."""
    import json
    tok = tiny_tokenizer()
    (path / "tokenizer").mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer" / "tokenizer.json"))
    save_model(tiny_model(tok.get_vocab_size()), path / "pretrain" / "final",
               tokenizer_path=path / "tokenizer" / "tokenizer.json")
    (path / "dedup").mkdir(parents=True, exist_ok=True)
    with open(path / "dedup" / "docs.jsonl", "w") as f:
        for d in stdlib_docs(n_docs):
            f.write(json.dumps(d) + "\n")
    return path
