"""Model configuration: a dataclass with named presets, parameter and FLOP counts."""
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

from quark.config import from_dict

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
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; available: {', '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides)


def load_config(directory):
    path = Path(directory) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{directory} is not a model directory: config.json is missing")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if "model_type" in data:   # a Hugging Face directory
        from quark.model.hf import config_from_hf
        return config_from_hf(data, str(path))
    return GPTConfig.from_dict(data, where=str(path))
