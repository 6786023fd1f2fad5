"""A scoring and generation interface over (GPT, tokenizer): what every evaluation needs, and
the core of the lm-evaluation-harness adapter."""
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from quark.chat import TemplateChat, chat_format
from quark.infer.engine import Engine
from quark.infer.measure import held_out
from quark.infer.sampling import SamplingParams
from quark.model.io import load_model
from quark.rundir import RunDir


def load_tokenizer(model_dir, run_dir=None):
    """The tokenizer beside the model, else the run's."""
    if run_dir is not None:
        return RunDir.of(run_dir).tokenizer(model_dir)
    path = Path(model_dir) / "tokenizer.json"
    if not path.exists():
        raise FileNotFoundError(f"no tokenizer.json in {model_dir}")
    return Tokenizer.from_file(str(path))


class LanguageModel:
    def __init__(self, model, tokenizer, max_batch_tokens=8192, eos_ids=None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_len = model.config.max_seq_len
        self.max_batch_tokens = max_batch_tokens
        if eos_ids is None:   # Quark's stop tokens; a checkpoint's own come from its chat format (from_dir)
            eos_ids = (tokenizer.token_to_id("<|eos|>"), tokenizer.token_to_id("<|end|>"))
        self.eos_ids = {i for i in eos_ids if i is not None}
        self._engine = None

    @classmethod
    def from_dir(cls, model_dir, run_dir=None):
        tokenizer = load_tokenizer(model_dir, run_dir)
        chat = chat_format(tokenizer, model_dir)   # a Hugging Face checkpoint's eos ids
        return cls(load_model(model_dir), tokenizer, eos_ids=chat.stop_ids if isinstance(chat, TemplateChat) else None)

    @classmethod
    def from_path(cls, path):
        """A run directory (its latest model) or a model directory."""
        run_dir, model_dir = RunDir.locate(path)
        return cls.from_dir(model_dir, run_dir)

    def encode(self, text):
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    @torch.no_grad()
    def loglikelihood(self, requests):
        """[(context, continuation)] -> [(sum log p(continuation | context), continuation is greedy)].
        Contexts are left-truncated so context + continuation fits the model's window."""
        out = []
        for context, continuation in requests:
            ctx, cont = self.encode(context), self.encode(continuation)
            if not cont:
                out.append((0.0, True))
                continue
            ids = (ctx + cont)[-(self.max_len + 1):]
            n_cont = min(len(cont), len(ids) - 1)
            x = torch.tensor(ids[:-1])[None]
            logp = F.log_softmax(self.model(x)[0][0].float(), dim=-1)        # (T, V)
            target = torch.tensor(ids[1:])
            tail = slice(len(ids) - 1 - n_cont, len(ids) - 1)
            lp = logp[tail].gather(1, target[tail, None]).sum().item()
            greedy = bool((logp[tail].argmax(-1) == target[tail]).all())
            out.append((lp, greedy))
        return out

    def rolling_nll(self, ids):
        """Total negative log-likelihood (nats) and count of the predicted tokens of a long token
        sequence, scored in disjoint windows of max_seq_len (every token after the first predicted once)."""
        per_window = self.window_nll(ids)
        return sum(n for n, _ in per_window), sum(c for _, c in per_window)

    @torch.no_grad()
    def window_nll(self, ids):
        """[(nll, count)] of each disjoint window of max_seq_len + 1 tokens, in order: the per-item
        losses the regression gate pairs across models."""
        ids = torch.as_tensor(ids, dtype=torch.long)
        W = self.max_len + 1
        windows = [ids[s: s + W] for s in range(0, max(len(ids) - 1, 0), self.max_len)]
        windows = [w for w in windows if len(w) > 1]
        per_batch = max(1, self.max_batch_tokens // self.max_len)
        n_full = sum(len(w) == W for w in windows)   # only the last window can be shorter: it runs alone
        groups = [torch.stack(windows[i:min(i + per_batch, n_full)]) for i in range(0, n_full, per_batch)]
        groups += [w[None] for w in windows[n_full:]]
        scored = held_out(self.model, [(g[:, :-1], g[:, 1:]) for g in groups])   # per window, in order
        return [(float(n), int(t)) for n, t in zip(scored.nll, scored.tokens)]

    @torch.no_grad()
    def generate(self, prompt, max_new_tokens=64, until=(), temperature=0.0, seed=0):
        """Greedy (or sampled) continuation of a text prompt, cut at the first stop string."""
        ids = self.encode(prompt)[-(self.max_len - 1):] or [next(iter(self.eos_ids), 0)]
        budget = max(0, min(max_new_tokens, self.max_len - len(ids)))
        if budget == 0:
            return ""
        if self._engine is None:   # built once: the engine fuses the model's projections when it starts
            self._engine = Engine(self.model, max_batch=1, stop_ids=self.eos_ids)
        out = self._engine.run([ids], SamplingParams(max_tokens=budget, temperature=temperature, seed=seed))[0].output_ids
        text = self.decode(out)
        for stop in until:
            if stop and stop in text:
                text = text[: text.index(stop)]
        return text
