"""Sampling: per-request parameters, logit processing (penalties, temperature, top-k, top-p) and
incremental detokenization with stop strings.

The processed distribution `probs(...)` is the one a token is drawn from; speculative decoding uses
the same function for target and draft so its output keeps the target's sampling distribution.
References: Holtzman et al. 2019 (top-p); Keskar et al. 2019 (CTRL repetition penalty); the OpenAI
API (presence/frequency penalties, stop strings).
"""
import os
from dataclasses import dataclass, field

import torch

MAX_STOP_CHARS = 256   # the detokenizer rescans a stop string's length of tail per token
MAX_LOGPROBS = 20     # alternatives per token, as OpenAI's top_logprobs
MIN_SCALE = 1e-3   # smallest temperature / repetition penalty: logits of ~1e3 still divide to finite float32

@dataclass
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 1.0          # 0: greedy
    top_k: int = 0                    # 0: off
    top_p: float = 1.0                # 1: off
    repetition_penalty: float = 1.0   # CTRL: divide positive / multiply negative logits of seen tokens
    presence_penalty: float = 0.0     # OpenAI: subtract once per seen token
    frequency_penalty: float = 0.0    # OpenAI: subtract per occurrence
    stop: list = field(default_factory=list)   # stop strings (not included in the output)
    seed: int | None = None
    logprobs: int | None = None       # None: off; k: each output token's log-prob and its k most likely alternatives
    prompt_logprobs: bool = False     # also the prompt tokens' log-probs (completions' echo)

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.validate()

    def validate(self):
        """Raise ValueError naming the first bad field (the server turns it into a 400)."""
        def bad(name, what):
            raise ValueError(f"{name} {what}, got {getattr(self, name)!r}")
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            bad("max_tokens", "must be a positive integer")
        # lower bounds keep logits / temperature and logits / penalty finite in float32
        if not _is_number(self.temperature) or not (self.temperature == 0 or MIN_SCALE <= self.temperature <= 100):
            bad("temperature", f"must be 0 (greedy) or a number in [{MIN_SCALE}, 100]")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            bad("top_k", "must be a non-negative integer")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            bad("top_p", "must be a number in (0, 1]")
        if not _is_number(self.repetition_penalty) or not MIN_SCALE <= self.repetition_penalty <= 10:
            bad("repetition_penalty", f"must be a number in [{MIN_SCALE}, 10]")
        for name in ("presence_penalty", "frequency_penalty"):
            if not _is_number(getattr(self, name)) or not -2 <= getattr(self, name) <= 2:
                bad(name, "must be a number in [-2, 2]")
        if not isinstance(self.stop, list) or len(self.stop) > 4 or not all(
                isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in self.stop):
            bad("stop", f"must be a string or a list of at most 4 strings, each of 1 to {MAX_STOP_CHARS} characters")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)
                                      or not -2 ** 63 <= self.seed < 2 ** 63):
            bad("seed", "must be a 64-bit signed integer")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or isinstance(self.logprobs, bool)
                                          or not 0 <= self.logprobs <= MAX_LOGPROBS):
            bad("logprobs", f"must be an integer in [0, {MAX_LOGPROBS}]")

    @property
    def greedy(self):
        return self.temperature == 0

    @property
    def penalized(self):
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0

    def generator(self):
        """A private RNG: seeded requests are reproducible whatever else the batch holds."""
        g = torch.Generator()
        g.manual_seed(self.seed if self.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
        return g


def _is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def apply_penalties(logits, history, params):
    """logits (V,) float32, history (N,) int64 ids seen so far (prompt + output) -> penalized copy."""
    if not params.penalized or history.numel() == 0:
        return logits
    logits = logits.clone()
    ids, counts = torch.unique(history, return_counts=True)
    seen = logits[ids]
    if params.repetition_penalty != 1:
        seen = torch.where(seen > 0, seen / params.repetition_penalty, seen * params.repetition_penalty)
    seen = seen - params.presence_penalty - params.frequency_penalty * counts.to(seen.dtype)
    logits[ids] = seen
    return logits


def _finite(logits):
    """NaN -> -inf (never drawn), +inf -> the largest float32; ValueError when no token is left."""
    logits = torch.nan_to_num(logits.float(), nan=float("-inf"), posinf=torch.finfo(torch.float32).max)
    if not torch.isfinite(logits).any():
        raise ValueError("the model produced no finite logit")
    return logits


def probs(logits, params, history=None):
    """logits (V,) -> the processed sampling distribution (V,) float32 (one-hot for greedy). Always a
    valid distribution: the top logit is shifted to 0 before scaling, so it keeps probability > 0."""
    logits = _finite(logits)
    if history is not None:
        logits = _finite(apply_penalties(logits, history, params))
    if params.greedy:
        out = torch.zeros_like(logits)
        out[logits.argmax()] = 1.0
        return out
    logits = (logits - logits.max()) / params.temperature
    if params.top_k and params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, -1).cumsum(-1)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop = (cum - torch.softmax(sorted_logits, -1)) >= params.top_p
        logits = logits.scatter(0, order[drop], float("-inf"))
    return torch.softmax(logits, -1)


def token_logprobs(logits, token, k):
    """The model's own log-softmax of logits (V,) -> (log p(token), [(id, log p)] for the k most likely ids)."""
    lp = torch.log_softmax(_finite(logits), -1)
    top = torch.topk(lp, k) if k else None
    return float(lp[token]), ([] if top is None else list(zip(top.indices.tolist(), top.values.tolist())))


def sample(logits, params, history=None, generator=None):
    """logits (V,) -> one token id."""
    if params.greedy:
        logits = _finite(logits)
        return int((apply_penalties(logits, history, params) if history is not None else logits).argmax())
    return int(torch.multinomial(probs(logits, params, history), 1, generator=generator))


class Detokenizer:
    """Turns a growing list of token ids into text deltas that are safe to send: holds back an
    incomplete UTF-8 sequence (decoded as U+FFFD) and any tail that could still become a stop string,
    and cuts the text at the first stop string."""

    def __init__(self, tokenizer, stop=()):
        self.tokenizer = tokenizer
        self.stop = list(stop)
        self.ids = []
        self.sent = 0          # characters already handed out
        self.text = ""
        self.stopped = False

    def add(self, token_id):
        """Append one id; returns the new text that may be sent now (possibly empty)."""
        self.ids.append(token_id)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        for s in self.stop:
            at = self.text.find(s, max(0, self.sent - len(s) + 1))
            if at >= 0:
                self.text = self.text[:at]
                self.stopped = True
        if self.stopped:
            return self.flush()
        safe = len(self.text)
        if self.text.endswith("\ufffd"):
            safe = len(self.text.rstrip("\ufffd"))
        hold = 0                # longest tail that is a proper prefix of some stop string
        for s in self.stop:
            for n in range(min(len(s) - 1, safe), hold, -1):
                if self.text[safe - n:safe] == s[:n]:
                    hold = n
                    break
        safe = max(safe - hold, self.sent)
        delta, self.sent = self.text[self.sent:safe], safe
        return delta

    def flush(self):
        """Everything not yet sent (at the end of generation)."""
        delta, self.sent = self.text[self.sent:], len(self.text)
        return delta
