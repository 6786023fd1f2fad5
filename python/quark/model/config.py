"""Model configuration: a dataclass with named presets, parameter and FLOP counts, and the reading of
a config.json (Quark's own, or a Hugging Face one: config_from_hf names every field it does not implement)."""
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

from quark.config import ConfigError, from_dict

# Required keys of each rope scaling type, beside rope_type (and rope_theta, which GPTConfig holds).
ROPE_SCALING_KEYS = {"linear": ("factor",), "dynamic": ("factor", "original_max_position_embeddings"),
                     "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


def check_rope_scaling(rope):
    kind = rope.get("rope_type")
    if kind not in ROPE_SCALING_KEYS:
        raise ValueError(f"rope_scaling type {kind!r} is not implemented; Quark has {', '.join(ROPE_SCALING_KEYS)}")
    missing = [k for k in ROPE_SCALING_KEYS[kind] if not isinstance(rope.get(k), (int, float))]
    extra = sorted(set(rope) - {"rope_type", *ROPE_SCALING_KEYS[kind]})
    if missing or extra:
        raise ValueError(f"rope_scaling {kind!r} needs numbers {list(ROPE_SCALING_KEYS[kind])}: "
                         f"missing {missing}, not implemented {extra}")


@dataclass
class GPTConfig:
    vocab_size: int = 4096
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 2          # < n_head: grouped-query attention; 1: multi-query
    d_model: int = 256
    ffn_hidden: int = 0         # 0: SwiGLU default of 8/3 * d_model rounded up to a multiple of 64
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    dropout: float = 0.0
    init_std: float = 0.02
    # Options of the Hugging Face Llama family (quark.model.hf); the defaults are Quark's own GPT.
    head_dim_override: int = 0  # 0: d_model // n_head; Qwen3 checkpoints fix their own head_dim
    qkv_bias: bool = False      # bias on the q/k/v projections (Qwen2; Llama attention_bias)
    o_bias: bool = False        # bias on the output projection (Llama attention_bias)
    mlp_bias: bool = False
    qk_norm: bool = False       # RMSNorm over head_dim on q and k before the rotation (Qwen3)
    sliding_window: int = 0     # > 0: a query sees only the last sliding_window keys, itself included (Mistral)
    rope_scaling: Optional[dict] = None   # transformers' rope_parameters of type "linear", "dynamic" or "llama3"

    def __post_init__(self):
        if not self.head_dim_override and self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if self.head_dim % 2:
            raise ValueError("head_dim must be even for rotary embeddings")
        if self.ffn_hidden == 0:
            self.ffn_hidden = ((8 * self.d_model // 3 + 63) // 64) * 64
        if self.rope_scaling is not None:
            check_rope_scaling(self.rope_scaling)

    @property
    def head_dim(self):
        return self.head_dim_override or self.d_model // self.n_head

    def num_params(self, non_embedding=False):
        d, f, L, V = self.d_model, self.ffn_hidden, self.n_layer, self.vocab_size
        q, kv = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        per_layer = 2 * d * q + 2 * d * kv + 3 * d * f + 2 * d   # q+o, k+v, SwiGLU, two norms
        embed = V * d * (1 if self.tie_embeddings else 2)
        total = L * per_layer + d + embed
        return total - (V * d if non_embedding else 0)

    def flops_per_token(self, seq_len=None):
        """Training FLOPs per token: 6 * non-embedding params (matmuls, fwd+bwd) plus attention
        scores 6 * L * T * d (QK^T and PV, fwd+bwd; halved for causal is ignored, as in PaLM)."""
        T = seq_len or self.max_seq_len
        return 6 * (self.num_params(non_embedding=True) + self.vocab_size * self.d_model) + 6 * self.n_layer * T * self.d_model

    def to_json(self):
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_dict(cls, d, where="model"):
        return from_dict(cls, d, where)

    def scaled(self, **changes):
        return replace(self, **changes)


PRESETS = {
    "nano": GPTConfig(vocab_size=2048, n_layer=2, n_head=4, n_kv_head=2, d_model=128, max_seq_len=128),
    "micro": GPTConfig(vocab_size=4096, n_layer=4, n_head=4, n_kv_head=2, d_model=256, max_seq_len=256),
    "small": GPTConfig(vocab_size=8192, n_layer=6, n_head=6, n_kv_head=2, d_model=384, max_seq_len=512),  # ~10M params + embeddings
    "base": GPTConfig(vocab_size=32000, n_layer=12, n_head=12, n_kv_head=4, d_model=768, max_seq_len=1024),
    "llama-1b": GPTConfig(vocab_size=32000, n_layer=16, n_head=32, n_kv_head=8, d_model=2048, ffn_hidden=8192,
                          max_seq_len=2048, rope_theta=500000.0, tie_embeddings=True),
}


def preset(name, **overrides):
    check_preset(name)
    return replace(PRESETS[name], **overrides)


def check_preset(name, key=None):
    """An unknown preset name -> ConfigError, prefixed with the config key that named it."""
    if name not in PRESETS:
        raise ConfigError(f"{key + ': ' if key else ''}unknown model preset {name!r}; available: {', '.join(PRESETS)}")


# ---- a Hugging Face config.json (quark.model.hf) -> GPTConfig -------------------------------------

def _any(v):
    return True


# Fields that change nothing at inference in transformers' modeling of these architectures, or that
# this loader reads: accepted when their value passes the check, else "not implemented".
_COMMON = {
    "architectures": _any, "model_type": _any, "transformers_version": _any, "torch_dtype": _any, "dtype": _any,
    "bos_token_id": _any, "eos_token_id": _any, "pad_token_id": _any, "initializer_range": _any, "use_cache": _any,
    "output_hidden_states": _any, "output_attentions": _any, "return_dict": _any, "id2label": _any,
    "label2id": _any, "problem_type": _any, "is_encoder_decoder": lambda v: v is False,
    "chunk_size_feed_forward": lambda v: v == 0, "pretraining_tp": _any,   # transformers >= 4.45 ignores it
    "vocab_size": _any, "hidden_size": _any, "intermediate_size": _any, "num_hidden_layers": _any,
    "num_attention_heads": _any, "num_key_value_heads": _any, "max_position_embeddings": _any,
    "rms_norm_eps": _any, "tie_word_embeddings": _any, "head_dim": _any, "rope_theta": _any,
    "rope_scaling": _any, "rope_parameters": _any, "hidden_act": lambda v: v == "silu",
    "attention_dropout": lambda v: v == 0,   # Quark's attention has no dropout
    "is_llama_config": _any, "rope_interleaved": lambda v: v is False,   # SmolLM2 (nanotron) leftovers
}
_NO_WINDOW = {"use_sliding_window": lambda v: v is False, "sliding_window": _any, "max_window_layers": _any,
              "layer_types": lambda v: all(t == "full_attention" for t in v)}
_FIELDS = {
    "llama": {**_COMMON, "attention_bias": _any, "mlp_bias": _any},
    "mistral": {**_COMMON, "sliding_window": _any},
    "qwen2": {**_COMMON, **_NO_WINDOW},
    "qwen3": {**_COMMON, **_NO_WINDOW, "attention_bias": _any},
}
# transformers' defaults for fields a config.json may leave out.
_DEFAULTS = {"llama": {"max_position_embeddings": 2048}, "mistral": {"max_position_embeddings": 131072},
             "qwen2": {"max_position_embeddings": 32768}, "qwen3": {"max_position_embeddings": 32768}}


def _rope(c, where):
    """(rope_theta, rope_scaling or None) from transformers >= 5 rope_parameters or the older
    rope_theta + rope_scaling ({"type": ...} before 4.45)."""
    rope = {**(c.get("rope_scaling") or {}), **(c.get("rope_parameters") or {})}
    theta = float(rope.pop("rope_theta", c.get("rope_theta", 10000.0)))
    kind = rope.pop("rope_type", rope.pop("type", "default"))
    if kind == "default":
        if rope:
            raise ValueError(f"{where}: rope parameters {sorted(rope)} are not implemented for the default rope")
        return theta, None
    if kind == "dynamic":   # transformers scales against max_position_embeddings, whatever else is written
        orig = rope.setdefault("original_max_position_embeddings", c["max_position_embeddings"])
        if orig != c["max_position_embeddings"]:
            raise ValueError(f"{where}: dynamic rope with original_max_position_embeddings {orig} != "
                             f"max_position_embeddings {c['max_position_embeddings']} is not implemented")
    try:
        return theta, GPTConfig(rope_scaling={"rope_type": kind, **rope}).rope_scaling
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def config_from_hf(c, where="config.json") -> GPTConfig:
    """The GPTConfig of a transformers config dict; ValueError names what Quark does not implement."""
    kind = c.get("model_type")
    if kind not in _FIELDS:
        raise ValueError(f"{where}: model_type {kind!r} is not supported; Quark loads {', '.join(_FIELDS)}")
    fields = _FIELDS[kind]
    for key, value in c.items():
        if key.startswith("_"):   # bookkeeping such as _name_or_path
            continue
        if key not in fields:
            raise ValueError(f"{where}: field {key!r} is not implemented for model_type {kind!r}")
        if value is not None and not fields[key](value):
            raise ValueError(f"{where}: {key}={value!r} is not implemented (Quark's {kind} needs its default)")
    c = {**_DEFAULTS[kind], **{k: v for k, v in c.items() if v is not None}}
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if key not in c:
            raise ValueError(f"{where}: {key} is missing")
    if kind != "llama" and "num_key_value_heads" not in c:
        raise ValueError(f"{where}: num_key_value_heads is missing")
    d, heads = c["hidden_size"], c["num_attention_heads"]
    head_dim = c.get("head_dim") or d // heads
    theta, scaling = _rope(c, where)
    max_pos = c["max_position_embeddings"]
    bias = bool(c.get("attention_bias", False))
    try:
        return GPTConfig(
            vocab_size=c["vocab_size"], n_layer=c["num_hidden_layers"], n_head=heads,
            n_kv_head=c.get("num_key_value_heads", heads), d_model=d, ffn_hidden=c["intermediate_size"],
            # dynamic rope exists to run past the original context: allow factor times it
            max_seq_len=int(max_pos * scaling["factor"]) if scaling and scaling["rope_type"] == "dynamic" else max_pos,
            rope_theta=theta, norm_eps=float(c.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(c.get("tie_word_embeddings", False)), init_std=c.get("initializer_range", 0.02),
            head_dim_override=head_dim if head_dim * heads != d else 0,
            qkv_bias=True if kind == "qwen2" else bias, o_bias=bias if kind in ("llama", "qwen3") else False,
            mlp_bias=bool(c.get("mlp_bias", False)), qk_norm=kind == "qwen3",
            sliding_window=int(c.get("sliding_window") or 0) if kind == "mistral" else 0, rope_scaling=scaling)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def load_config(directory):
    path = Path(directory) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{directory} is not a model directory: config.json is missing")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if "model_type" in data:   # a Hugging Face directory
        return config_from_hf(data, str(path))
    return GPTConfig.from_dict(data, where=str(path))
