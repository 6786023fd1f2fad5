"""Calibration for int4 methods (AWQ, GPTQ): token windows of the training split, the hidden states
entering the first block, and one block run over them. (Which layers stay in float:
quark.nn.patch.is_skipped.)"""
import numpy as np
import torch

from quark.rundir import RunDir


def load_calibration(run_dir, n_sequences=128, seq_len=128, seed=0, model_dir=None):
    """(n_sequences, seq_len) int64 windows drawn at random from the run's packed training tokens, in
    model_dir's own tokens (RunDir.tokens). The training split, never val.bin: the held-out perplexity
    must not see calibration text."""
    tokens = RunDir.of(run_dir).tokens("train", model_dir)
    if len(tokens) < seq_len + 1:
        raise ValueError(f"the run's pack/train.bin holds {len(tokens)} tokens; calibration needs at least seq_len={seq_len}")
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(tokens) - seq_len, size=n_sequences)
    return torch.from_numpy(np.stack([np.asarray(tokens[s:s + seq_len], dtype=np.int64) for s in starts]))


@torch.no_grad()
def block_inputs(model, tokens, batch_size=16):
    """Calibration hidden states entering the first block: (x (n, T, d), cos, sin)."""
    T = tokens.shape[1]
    if T > model.config.max_seq_len:
        raise ValueError(f"calibration seq_len {T} exceeds the model's max_seq_len {model.config.max_seq_len}")
    if int(tokens.max()) >= model.config.vocab_size:
        raise ValueError(f"calibration token id {int(tokens.max())} >= vocab_size {model.config.vocab_size}: "
                         "the calibration data was packed with another tokenizer")
    x = torch.cat([model.tok_emb(tokens[i:i + batch_size]) for i in range(0, len(tokens), batch_size)])
    return x.float(), model.rope_cos[:T], model.rope_sin[:T]


@torch.no_grad()
def run_block(block, x, cos, sin, batch_size=16):
    """One transformer block over all calibration sequences, batch_size sequences at a time."""
    return torch.cat([block(x[i:i + batch_size], cos, sin) for i in range(0, len(x), batch_size)])
