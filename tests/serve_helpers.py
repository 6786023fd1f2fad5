"""Shared fixtures of the serve tests: a tiny byte-level BPE tokenizer with the chat special tokens,
a tiny random GPT saved as a model directory, LoRA adapters of it, and a real uvicorn server on a free 127.0.0.1 port."""
import contextlib
import copy
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from quark.chat import SPECIAL_TOKENS
from quark.model import GPT, GPTConfig
from quark.model.io import save_model
from quark.model.lora import LoRAConfig, apply_lora, lora_modules, save_adapter, strip_lora

CORPUS = ["The quick brown fox jumps over the lazy dog.", "Hello world, this is Quark serving text.",
          "def add(a, b):\n    return a + b\n", "Numbers 0123456789 and symbols !?.,;:()[]{}",
          "Ünïcödé text: naïve café, 東京, emoji 🙂."] * 20


def make_tokenizer(path=None):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    if path is not None:
        tok.save(str(path))
    return tok


def make_model(vocab_size, seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=vocab_size, n_layer=2, n_head=4, n_kv_head=2, d_model=64, max_seq_len=256, init_std=0.1)
    model = GPT(GPTConfig(**(cfg | overrides))).eval()
    with torch.no_grad():   # special tokens (ids 0..7) get zero logits, so random text is mostly visible text
        model.tok_emb.weight[:len(SPECIAL_TOKENS)] = 0
    return model


@torch.no_grad()
def perturbed(model, scale=0.05):
    """A copy with noise on every weight: a draft model that mostly agrees with the model."""
    draft = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    for w in draft.parameters():
        w += scale * torch.randn(w.shape, generator=g) * w.std()
    return draft


def make_model_dir(directory, seed=0, **overrides):
    """A model directory with tokenizer.json, as the training steps write it -> (dir, model, tokenizer)."""
    directory.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(directory / "tokenizer.json")
    model = make_model(tok.get_vocab_size(), seed, **overrides)
    save_model(model, directory)
    return directory, model, tok


def make_adapter(base, directory, targets, seed, rank=4, alpha=8.0):
    """Save a LoRA adapter of base with random (non-zero) B -> a copy of base with it merged into the weights."""
    m = copy.deepcopy(base)
    apply_lora(m, LoRAConfig(rank=rank, alpha=alpha, targets=targets))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in lora_modules(m).values():
            mod.lora_B.copy_(torch.randn(mod.lora_B.shape, generator=g) * 0.3)
    save_adapter(m, directory)
    return strip_lora(m).eval()


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Tiny models run single-threaded: at this size OpenMP fork/join dominates every op, and on a
    shared 2-core machine a second thread makes each op wait for a busy core."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn serving app on 127.0.0.1 in a thread; stop() is the graceful shutdown path."""

    def __init__(self, app):
        import uvicorn
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    timeout_graceful_shutdown=10))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)


@contextlib.contextmanager
def serve_process(*args):
    """`quark serve ARGS` as a real process on a free 127.0.0.1 port -> its base URL once /health answers."""
    import httpx
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "quark.cli", "serve", *map(str, args), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.time() > deadline or proc.poll() is not None:
                raise RuntimeError(f"server did not start: {proc.stdout.read().decode() if proc.poll() is not None else ''}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
