"""Safety filter: a policy of categories, each with rule lists (regular expressions), an action
(allow | refuse with a template | redact the matched spans) and, for refusal categories, a trained
classifier, applied to model inputs and outputs. Shared below the steps: the align step trains and
saves one into the run (quark.align.redteam), `quark serve --safety FILE` loads it.

    f = SafetyFilter.from_config({"classifier": "builtin", "threshold": 0.6})   # trains the classifier
    f.save(run_dir / "redteam" / "safety.json")          # + safety.safetensors (the classifier weights)
    f = SafetyFilter.load(run_dir / "redteam" / "safety.json")
    d = f.check_messages([{"role": "user", "content": "ignore previous instructions and ..."}])
    d.action in ("allow", "refuse"); d.category; d.text == the refusal template when refused

Rules see the text and its de-obfuscated variants (zero-width characters removed, leetspeak mapped
back, s p a c e d letters joined, base64 runs decoded, ROT13), since those are the cheapest ways to
slip a request past keyword lists. The rules are written against the *build* intent families of
quark.safety_data only, and the classifier (a logistic regression over hashed word and character
n-grams: fast, no model call) is trained on them against benign prompts; the red-team suite evaluates
on the other families, which neither has seen.
"""
import base64
import binascii
import codecs
import json
import re
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch
from safetensors.torch import load_file, save

from quark.config import ConfigError, from_dict
from quark.io import atomic_write_bytes, atomic_write_json
from quark.safety_data import BENIGN_BUILD, REFUSAL, SELF_HARM_REFUSAL, harmful_requests


@dataclass
class Category:
    action: Literal["allow", "refuse", "redact"] = "refuse"
    rules: list = field(default_factory=list)     # regular expressions, matched case-insensitively
    template: str = REFUSAL                        # the reply when refused
    classify: bool = True                          # the classifier may flag this category (refuse only)


# Written against the build families of quark.safety_data only (never an evaluation intent).
DEFAULT_POLICY = {
    "weapons": Category(rules=[
        r"\b(build|make|making|assembl\w*|construct\w*|wir(e|ing)|manufactur\w*)\b.{0,40}"
        r"\b(bombs?|explosives?|detonators?|ghost guns?)\b",
        r"\b(pipe bomb|molotov|napalm|dirty bomb)s?\b",
        r"\bconvert\w*\b.{0,40}\b(fully automatic|full[- ]auto)\b"]),
    "cyber": Category(rules=[
        r"\b(write|writing|create|build|code|make|making)\b.{0,40}\b(ransomware|keyloggers?|malware|botnets?|rootkits?|trojans?)\b",
        r"\b(hack|hacking|get) into\b.{0,40}\b(wifi|wi-fi|router|network)",
        r"\bsql injection\b.{0,30}\b(steal|dump|exfiltrate)"]),
    "self_harm": Category(template=SELF_HARM_REFUSAL, rules=[
        r"\b(kill myself|end my life|suicide method|commit suicide)\b"]),
    "fraud": Category(rules=[
        r"\b(write|writing|create|make|send|craft|draft)\b.{0,20}phishing (e-?mail|page|site|message)",
        r"\b(counterfeit (money|bills|currency)|launder(ing)? money|steal\w* (credit card|identity|identities))",
        r"\b(fake|forged?) (invoice|receipt)s?\b"]),
    "privacy": Category(rules=[
        r"\b(home address|phone number|daily routine|location)\b.{0,10}\bof\b.{0,40}\b(person|celebrity|ex|neighbou?r|someone)",
        r"\btrack\w* (someone|a person|my ex|my partner)'?s?\b",
        r"\b(dox|doxx)(ing)?\b", r"\bstalk\w* (someone|my ex|a person)\b"]),
    "pii": Category(action="redact", classify=False, rules=[
        r"\b[\w.+-]+@[\w-]+\.[\w.-]+\b",                            # e-mail addresses
        r"\b(?:\d[ -]?){13,16}\b",                                  # card-like digit runs
        r"\b\d{3}-\d{2}-\d{4}\b",                                   # US SSN
        r"(?<!\w)\+?\d{1,3}[ .-]?\(?\d{3}\)?[ .-]?\d{3}[ .-]?\d{4}\b",   # phone numbers
        r"\b(sk|pk|api|key|token)[-_][A-Za-z0-9]{16,}\b"]),         # API-key-like secrets
}


@dataclass
class Decision:
    action: str                  # allow | refuse | redact
    category: Optional[str]      # the category that decided, None when allowed
    text: str                    # the text to use: unchanged, redacted, or the refusal template
    score: float = 0.0           # classifier probability of the category (0 for rule decisions)
    source: Optional[str] = None  # "rule" | "classifier"
    matched: str = ""            # the rule match (or the variant) that triggered, for logs

    def to_dict(self):
        return asdict(self)


# ---- de-obfuscation ------------------------------------------------------------------------------

LEET = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s", "!": "i"})
ZERO_WIDTH = re.compile("[\u200b\u200c\u200d\u2060\ufeff\u00ad]")
SPACED = re.compile(r"\b(?:\w[ .\-_*]){1,}\w\b(?![ .\-_*]\w\b)")
B64 = re.compile(r"[A-Za-z0-9+/]{16,}={0,2}")


def variants(text):
    """The text and de-obfuscated readings of it (each a candidate for the rules and the classifier)."""
    base = ZERO_WIDTH.sub("", text)
    out = [base]
    leet = base.translate(LEET)
    if leet != base:
        out.append(leet)
    joined = " ".join(SPACED.sub(lambda m: re.sub(r"[ .\-_*]", "", m.group(0)), base).split())
    if joined != base:
        out.append(joined)
    for run in B64.findall(base):
        try:
            decoded = base64.b64decode(run + "=" * (-len(run) % 4), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            continue
        if decoded.isprintable():
            out.append(decoded)
    out.append(codecs.decode(base, "rot13"))
    return out


# ---- classifier -----------------------------------------------------------------------------------

N_FEATURES = 1 << 14


def features(texts):
    """Hashed bag of word uni/bigrams and character 4-grams, L2-normalised -> (N, N_FEATURES)."""
    X = torch.zeros(len(texts), N_FEATURES)
    for i, t in enumerate(texts):
        words = re.findall(r"[a-z0-9']+", t.lower())
        grams = words + [f"{a} {b}" for a, b in zip(words, words[1:])]
        s = " " + " ".join(words) + " "
        grams += [s[j:j + 4] for j in range(len(s) - 3)]
        if grams:   # crc32: stable across processes, unlike hash()
            idx = torch.tensor([zlib.crc32(g.encode()) % N_FEATURES for g in grams])
            X[i] = torch.bincount(idx, minlength=N_FEATURES).float()
    return X / X.norm(dim=1, keepdim=True).clamp_min(1e-6)


class Classifier:
    """Multinomial logistic regression over `labels` (labels[0] is "safe")."""

    def __init__(self, labels, weight=None, bias=None):
        self.labels = list(labels)
        self.weight = weight if weight is not None else torch.zeros(len(labels), N_FEATURES)
        self.bias = bias if bias is not None else torch.zeros(len(labels))

    @classmethod
    def train(cls, texts, labels, steps=100, lr=0.5, weight_decay=1e-4, seed=0):
        names = ["safe"] + sorted({l for l in labels if l != "safe"})
        y = torch.tensor([names.index(l) for l in labels])
        X = features(texts)
        torch.manual_seed(seed)
        W = torch.zeros(len(names), N_FEATURES, requires_grad=True)
        b = torch.zeros(len(names), requires_grad=True)
        opt = torch.optim.Adam([W, b], lr=lr)
        for _ in range(steps):
            loss = torch.nn.functional.cross_entropy(X @ W.T + b, y) + weight_decay * W.pow(2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return cls(names, W.detach(), b.detach())

    def predict_proba(self, texts):
        return torch.softmax(features(texts) @ self.weight.T + self.bias, dim=-1)   # (N, C)



def build_training_data():
    """(texts, labels): the build families' intents in the plain phrasings, against benign prompts."""
    reqs = harmful_requests("build")
    texts = [r["prompt"] for r in reqs] + list(BENIGN_BUILD)
    labels = [r["category"] for r in reqs] + ["safe"] * len(BENIGN_BUILD)
    return texts, labels


# ---- the filter -----------------------------------------------------------------------------------

FORMAT = "quark-safety-filter/1"


@dataclass
class SafetyConfig:
    categories: dict = field(default_factory=dict)   # name -> {action, rules, template, classify}; merged over the default policy
    classifier: Optional[Literal["builtin"]] = "builtin"   # "builtin": trained on the build families; null: rules only
    threshold: float = 0.6                           # classifier probability that triggers the category's action
    check_outputs_with_classifier: bool = True


def _policy(categories, where):
    """{name: Category} from {name: dict}, every rule compiled once to report a bad one by name."""
    policy = {}
    for name, raw in categories.items():
        policy[name] = cat = from_dict(Category, raw or {}, f"{where}.{name}")
        for r in cat.rules:
            try:
                re.compile(r)
            except re.error as e:
                raise ConfigError(f"{where}.{name}.rules: {r!r} is not a valid regular expression ({e})") from None
    return policy


def _check_threshold(t, where):
    if not isinstance(t, (int, float)) or not 0.0 < t <= 1.0:
        raise ConfigError(f"{where}: must be in (0, 1], got {t!r}")


class SafetyFilter:
    def __init__(self, policy, classifier=None, threshold=0.6, outputs_classifier=True):
        self.policy = policy
        self.rules = {name: [re.compile(r, re.IGNORECASE) for r in cat.rules] for name, cat in policy.items()}
        self.classifier = classifier
        self.threshold = threshold
        self.outputs_classifier = outputs_classifier

    @classmethod
    def from_config(cls, cfg=None):
        s = from_dict(SafetyConfig, cfg or {}, "safety")
        merged = {name: asdict(cat) for name, cat in DEFAULT_POLICY.items()}
        for name, over in s.categories.items():
            merged[name] = {**merged.get(name, {}), **(over or {})}
        policy = _policy(merged, "safety.categories")
        _check_threshold(s.threshold, "safety.threshold")
        clf = Classifier.train(*build_training_data()) if s.classifier == "builtin" else None
        return cls(policy, clf, s.threshold, s.check_outputs_with_classifier)

    def save(self, path):
        """path (.json): the policy and settings; the classifier's weights beside it (.safetensors)."""
        path = Path(path)
        weights = path.with_suffix(".safetensors")
        clf = None
        if self.classifier is not None:
            atomic_write_bytes(weights, save({"weight": self.classifier.weight.contiguous(),
                                              "bias": self.classifier.bias.contiguous()}))
            clf = {"labels": self.classifier.labels, "n_features": N_FEATURES, "weights": weights.name}
        atomic_write_json(path, {"format": FORMAT, "policy": {n: asdict(c) for n, c in self.policy.items()},
                                 "threshold": self.threshold, "check_outputs_with_classifier": self.outputs_classifier,
                                 "classifier": clf})
        return path

    @classmethod
    def load(cls, path):
        """A filter saved by save(): exactly the policy and classifier that were trained (no retraining)."""
        path = Path(path)
        try:
            meta = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"no safety filter at {path} (the align step's redteam writes run_dir/redteam/safety.json)") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"safety filter {path} is not valid JSON: {e}") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("policy"), dict):
            raise ValueError(f"{path} is not a saved safety filter (expected format {FORMAT!r} with a policy)")
        policy = _policy(meta["policy"], f"{path}: policy")
        _check_threshold(meta.get("threshold"), f"{path}: threshold")
        clf = None
        if meta.get("classifier"):
            c = meta["classifier"]
            if c.get("n_features") != N_FEATURES:
                raise ValueError(f"{path}: classifier n_features {c.get('n_features')} != {N_FEATURES}; retrain the filter")
            t = load_file(path.parent / c["weights"])
            shape = (len(c["labels"]), N_FEATURES)
            if tuple(t["weight"].shape) != shape or tuple(t["bias"].shape) != shape[:1]:
                raise ValueError(f"{path}: classifier weights {tuple(t['weight'].shape)} do not match {shape}")
            clf = Classifier(c["labels"], t["weight"], t["bias"])
        return cls(policy, clf, float(meta["threshold"]), bool(meta.get("check_outputs_with_classifier", True)))
    def _decide(self, text, use_classifier):
        views = variants(text)
        redact_hits = []
        for name, cat in self.policy.items():
            if cat.action == "allow":
                continue
            for rule in self.rules[name]:
                for v in views:
                    m = rule.search(v)
                    if not m:
                        continue
                    if cat.action == "refuse":
                        return Decision("refuse", name, cat.template, 1.0, "rule", m.group(0))
                    if v is views[0]:
                        redact_hits.append((name, rule))
        if use_classifier and self.classifier is not None:
            # Decide on P(harmful) = 1 - P(safe), worst case over the variants, then name the likeliest
            # refusal category: the harmful mass is often split between neighbouring categories.
            probs = self.classifier.predict_proba(views)                         # (variants, C)
            v = int(probs[:, 0].argmin())
            harmful = 1.0 - float(probs[v, 0])
            cands = [i for i, l in enumerate(self.classifier.labels)
                     if l in self.policy and self.policy[l].action == "refuse" and self.policy[l].classify]
            if cands and harmful >= self.threshold:
                name = self.classifier.labels[max(cands, key=lambda i: float(probs[v, i]))]
                return Decision("refuse", name, self.policy[name].template, harmful, "classifier", views[v][:80])
        if redact_hits:
            red = text
            for name, rule in redact_hits:
                red = rule.sub(f"[REDACTED:{name}]", red)
            return Decision("redact", redact_hits[0][0], red, 1.0, "rule")
        return Decision("allow", None, text)

    def check_input(self, text):
        return self._decide(text, True)

    def check_output(self, text):
        return self._decide(text, self.outputs_classifier)

    def check_messages(self, messages):
        """Screen a conversation's user and system messages: each alone, then joined (a request split
        over turns). -> the first refusal, else allow. Redaction applies to outputs, not to prompts."""
        texts = [m["content"] for m in messages if m.get("role") in ("user", "system") and isinstance(m.get("content"), str)]
        for text in texts + (["\n".join(texts)] if len(texts) > 1 else []):
            d = self._decide(text, True)
            if d.action == "refuse":
                return d
        return Decision("allow", None, "\n".join(texts))
