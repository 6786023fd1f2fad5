"""Intent classifier on text embeddings, with calibrated confidence and an "unknown" answer.

Model: multinomial logistic regression on the (unit) embeddings of any embedder of
quark.retrieval.embed, trained full-batch with L-BFGS and an L2 penalty. Calibration: temperature
scaling on a held-out split (Guo et al. 2017, "On Calibration of Modern Neural Networks"), which
rescales the logits without changing the argmax; expected calibration error (ECE) is reported before
and after. "unknown": a prediction whose calibrated confidence is below `threshold` is answered as
UNKNOWN. Training examples labelled "unknown" (out-of-scope texts) are not a softmax class; they
pick the threshold on the held-out split (the one that best separates in-scope from out-of-scope),
and without them the threshold keeps 95% of correct held-out predictions.

Saved as classifier.safetensors (weights) + classifier.json (labels, temperature, threshold, embedder).
"""
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from quark.io import atomic_write_json

UNKNOWN = "unknown"


@dataclass
class Prediction:
    intent: str            # a label, or UNKNOWN
    confidence: float      # calibrated probability of the top label
    label: str             # the top label even when the answer is UNKNOWN
    probs: dict


def expected_calibration_error(probs, labels, bins=10):
    """ECE: |accuracy - confidence| averaged over equal-width confidence bins, weighted by bin size."""
    probs, labels = np.asarray(probs), np.asarray(labels)
    if len(labels) == 0:
        return 0.0
    conf, pred = probs.max(1), probs.argmax(1)
    correct = (pred == labels).astype(np.float64)
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


class IntentClassifier:
    def __init__(self, embedder, labels=None, weight=None, bias=None, temperature=1.0, threshold=0.5):
        self.embedder = embedder
        self.labels = list(labels or [])
        self.weight, self.bias = weight, bias          # (C, d), (C,)
        self.temperature, self.threshold = temperature, threshold
        self.report = {}

    def _logits(self, x):
        return torch.from_numpy(x) @ self.weight.T + self.bias                   # (n, C)

    def fit(self, texts, intents, val_fraction=0.25, l2=1e-3, threshold=None, seed=0):
        """Train on (text, intent) pairs; intents equal to "unknown" are out-of-scope examples.
        threshold=None picks it on the held-out split. -> report dict (accuracy, ECE, threshold)."""
        texts, intents = list(texts), list(intents)
        if len(texts) != len(intents) or not texts:
            raise ValueError(f"need as many intents as texts (got {len(texts)} texts, {len(intents)} intents)")
        self.labels = sorted({i for i in intents if i != UNKNOWN})
        if len(self.labels) < 2:
            raise ValueError(f"need at least two intents besides {UNKNOWN!r}, got {self.labels}")
        x = self.embedder.embed(texts)
        y = np.array([self.labels.index(i) if i != UNKNOWN else -1 for i in intents])
        train, val = _stratified_split(y, val_fraction, seed)
        known_tr = train[y[train] >= 0]
        self.weight, self.bias = _train_logreg(x[known_tr], y[known_tr], len(self.labels), l2, seed)
        known_val = val[y[val] >= 0]
        with torch.no_grad():
            logits_val = self._logits(x[known_val])
        self.temperature = _fit_temperature(logits_val, torch.from_numpy(y[known_val])) if len(known_val) else 1.0
        probs_val = torch.softmax(logits_val / self.temperature, -1).numpy()
        raw_val = torch.softmax(logits_val, -1).numpy()
        ood_val = val[y[val] < 0]
        ood_conf = self.predict_proba_x(x[ood_val]).max(1) if len(ood_val) else np.zeros(0)
        if threshold is not None:
            self.threshold = float(threshold)
        else:
            self.threshold = _pick_threshold(probs_val, y[known_val], ood_conf)
        acc = float((probs_val.argmax(1) == y[known_val]).mean()) if len(known_val) else float("nan")
        self.report = {"labels": self.labels, "n_train": int(len(train)), "n_val": int(len(val)),
                       "val_accuracy": round(acc, 4), "temperature": round(self.temperature, 4),
                       "ece_before": round(expected_calibration_error(raw_val, y[known_val]), 4),
                       "ece_after": round(expected_calibration_error(probs_val, y[known_val]), 4),
                       "threshold": round(self.threshold, 4),
                       "val_unknown_rejected": round(float((ood_conf < self.threshold).mean()), 4) if len(ood_conf) else None}
        return self.report

    def predict_proba_x(self, x):
        with torch.no_grad():
            return torch.softmax(self._logits(np.ascontiguousarray(x, np.float32)) / self.temperature, -1).numpy()

    def predict(self, texts):
        if self.weight is None:
            raise RuntimeError("the classifier is not trained: call fit() or load()")
        probs = self.predict_proba_x(self.embedder.embed(list(texts)))
        out = []
        for p in probs:
            top = int(p.argmax())
            conf = float(p[top])
            out.append(Prediction(self.labels[top] if conf >= self.threshold else UNKNOWN, conf, self.labels[top],
                                  {lab: float(v) for lab, v in zip(self.labels, p)}))
        return out

    def save(self, directory):
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({"weight": self.weight.contiguous(), "bias": self.bias.contiguous()}, str(directory / "classifier.safetensors"))
        atomic_write_json(directory / "classifier.json", {"labels": self.labels, "temperature": self.temperature,
                                                          "threshold": self.threshold, "embedder": self.embedder.name,
                                                          "report": self.report})
        return directory

    @classmethod
    def load(cls, directory, embedder):
        directory = Path(directory)
        meta_path = directory / "classifier.json"
        if not meta_path.exists():
            raise FileNotFoundError(f"{directory} holds no intent classifier (classifier.json missing)")
        meta = json.loads(meta_path.read_text())
        if meta["embedder"] != embedder.name:
            raise ValueError(f"classifier in {directory} was trained on embedder {meta['embedder']!r}, "
                             f"not {embedder.name!r}")
        w = load_file(str(directory / "classifier.safetensors"))
        clf = cls(embedder, meta["labels"], w["weight"], w["bias"], meta["temperature"], meta["threshold"])
        clf.report = meta.get("report", {})
        return clf


def _stratified_split(y, val_fraction, seed):
    rng = random.Random(seed)
    train, val = [], []
    for c in sorted(set(y.tolist())):
        idx = [i for i in range(len(y)) if y[i] == c]
        rng.shuffle(idx)
        n_val = int(round(len(idx) * val_fraction)) if len(idx) > 1 else 0
        val += idx[:n_val]
        train += idx[n_val:]
    return np.array(sorted(train), dtype=np.int64), np.array(sorted(val), dtype=np.int64)


def _train_logreg(x, y, n_classes, l2, seed):
    torch.manual_seed(seed)
    X, Y = torch.from_numpy(x), torch.from_numpy(y)
    W = torch.zeros(n_classes, x.shape[1], requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(X @ W.T + b, Y) + l2 * (W * W).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return W.detach(), b.detach()


def _fit_temperature(logits, y):
    """argmin_T NLL(softmax(logits / T)) over log T (keeps T > 0)."""
    log_t = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp().clamp(0.05, 20.0))


def _pick_threshold(probs_val, y_val, ood_conf):
    conf = probs_val.max(1) if len(probs_val) else np.zeros(0)
    correct = conf[probs_val.argmax(1) == y_val] if len(probs_val) else np.zeros(0)
    if len(ood_conf) and len(conf):
        # Balanced accuracy of "answer vs reject": in-scope answered correctly, out-of-scope rejected.
        cands = np.unique(np.concatenate([conf, ood_conf, [0.0]]))
        best = max(cands, key=lambda t: ((conf >= t) & (probs_val.argmax(1) == y_val)).mean() + (ood_conf < t).mean())
        below = np.concatenate([conf, ood_conf])
        below = below[below < best]
        return float((best + below.max()) / 2) if len(below) else float(best)   # midway between the two groups
    if len(correct):
        return float(np.quantile(correct, 0.05))
    return 0.5
