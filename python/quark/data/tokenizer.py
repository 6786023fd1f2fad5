"""Tokenizer training (pipeline step `tokenizer`): dedup/docs.jsonl -> tokenizer/tokenizer.json.

A byte-level BPE (GPT-2 style: the 256 byte symbols as the base alphabet, GPT-2's pre-tokenizer
regex, no normaliser) trained with HF tokenizers from a streaming iterator over the corpus. With no
normaliser and byte-level symbols, decode(encode(text)) == text for every UTF-8 string. The chat
special tokens of quark.chat.SPECIAL_TOKENS are added first, so they get ids 0..7 in that order
(<|bos|> = 0, <|eos|> = 1, <|pad|> = 2, ...), and are never split or merged.
"""
import json
import sys
import time
from dataclasses import dataclass

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from quark.chat import SPECIAL_TOKENS
from quark.config import ConfigError, Step, from_dict
from quark.io import atomic_write_json, atomic_write_text
from quark.rundir import RunDir


@dataclass
class TokenizerConfig:
    vocab_size: int = 4096           # the default model's vocab (quark.model.config.GPTConfig)
    min_frequency: int = 2
    max_chars: int = 20_000_000      # train on at most this many characters of the corpus (BPE merges settle long before)
    seed: int = 0

    def __post_init__(self):
        if not 256 + len(SPECIAL_TOKENS) < self.vocab_size <= 1 << 20:
            raise ConfigError(f"tokenizer.vocab_size: must be in ({256 + len(SPECIAL_TOKENS)}, {1 << 20}], "
                              f"got {self.vocab_size}")
        if self.min_frequency < 1 or self.max_chars < 1:
            raise ConfigError("tokenizer.min_frequency and tokenizer.max_chars: must be >= 1")


def validate_config(cfg):
    from_dict(TokenizerConfig, cfg, "tokenizer")


def new_tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def train(texts, vocab_size=4096, min_frequency=2, show_progress=False):
    """Train a byte-level BPE on an iterable of strings; -> tokenizers.Tokenizer."""
    tok = new_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def corpus_texts(path, max_chars):
    """Texts of a JSONL corpus, stopping once max_chars characters were yielded (streaming)."""
    total = 0
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{path}:{n}: not a JSON record with 'text'") from None
            yield text[:max_chars - total]
            total += len(text)
            if total >= max_chars:
                return


def run_step(run_dir, cfg):
    c = from_dict(TokenizerConfig, cfg, "tokenizer")
    run_dir = RunDir.of(run_dir)
    src = run_dir.input("dedup", "docs.jsonl")
    t0 = time.time()
    counted = {"docs": 0, "chars": 0}

    def texts():
        for t in corpus_texts(src, c.max_chars):
            counted["docs"] += 1
            counted["chars"] += len(t)
            yield t

    # Training is one call into Rust (its own progress bar); it is short, so an interrupted run
    # simply retrains, and the result is written atomically.
    tok = train(texts(), c.vocab_size, c.min_frequency, show_progress=sys.stderr.isatty())
    out = run_dir.output("tokenizer")
    atomic_write_text(out / "tokenizer.json", tok.to_str())
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    stats = {"vocab_size": tok.get_vocab_size(), "requested_vocab_size": c.vocab_size, "docs": counted["docs"],
             "chars": counted["chars"], "special_tokens": ids, "seconds": round(time.time() - t0, 2)}
    atomic_write_json(out / "stats.json", stats)
    return stats


STEP = Step(name="tokenizer", config=TokenizerConfig, run=run_step, check=validate_config)
