import os

import pytest

import quark
from quark import _C

ISA_ORDER = ("scalar", "avx2", "avx512", "avx512_bf16", "amx")
SUPPORTED_ISAS = ISA_ORDER[: ISA_ORDER.index(_C.detected_isa()) + 1]


@pytest.fixture(params=SUPPORTED_ISAS)
def isa(request):
    """Run the test once per ISA path this CPU supports (quark.isa caps the dispatch level)."""
    with quark.isa(request.param):
        yield request.param


@pytest.fixture(autouse=True)
def _quiet_tokenizers():
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    yield


CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog.",
    "Python is a programming language that lets you work quickly.",
    "import os\nprint(os.path.join('a', 'b'))\n",
] * 30


def make_tokenizer(vocab_size=400, corpus=CORPUS):
    """A small byte-level BPE tokenizer with the chat special tokens (trained in ~0.1 s)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from quark.chat import SPECIAL_TOKENS
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return tok


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved random tiny GPT with its tokenizer.json: a real model directory."""
    import torch

    from quark.model import GPT, GPTConfig
    from quark.model.io import save_model
    d = tmp_path_factory.mktemp("tiny_model")
    tok = make_tokenizer()
    tok.save(str(d / "tokenizer.json"))
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=tok.get_vocab_size(), n_layer=2, n_head=2, n_kv_head=1, d_model=64, max_seq_len=96)
    save_model(GPT(cfg), d)
    return d
