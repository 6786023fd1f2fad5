"""LoRA: low-rank adapters on the linear layers of a GPT (Hu et al. 2021, "LoRA: Low-Rank Adaptation
of Large Language Models").

    y = x W^T + (alpha / r) * dropout(x) A^T B^T        A (r, in) ~ N(0, 1/r)-ish, B (out, r) = 0

B starts at zero so an adapted model begins exactly equal to its base. Only A and B train; the base
weights are frozen. merge() folds the update into W for inference and keeps the original W aside, so
unmerge() restores it bit for bit. Adapters are saved alone (adapter.safetensors + adapter_config.json)
and loaded onto a base model built from the same config.
"""
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from quark.config import from_dict
from quark.io import atomic_write_bytes, atomic_write_text

# Linear layers of quark.model.gpt that may carry adapters (lm_head is tied to the embedding, so no).
TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


@dataclass
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list = field(default_factory=lambda: ["wq", "wv"])

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets:
            raise ValueError(f"LoRA targets must be a non-empty subset of {list(TARGETS)}, got {self.targets}")


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank, alpha, dropout=0.0):
        super().__init__()
        self.base = base
        self.base.weight.requires_grad_(False)
        self.rank, self.scale = rank, alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=base.weight.dtype, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=base.weight.dtype, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))   # as nn.Linear / the reference implementation
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._unmerged_weight = None   # the original W while merged

    @property
    def merged(self):
        return self._unmerged_weight is not None

    def delta_weight(self):
        return (self.lora_B @ self.lora_A) * self.scale   # (out, in)

    def forward(self, x):
        y = self.base(x)
        if self.merged:
            return y
        return y + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scale

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self._unmerged_weight = self.base.weight.detach().clone()
            self.base.weight += self.delta_weight()

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.base.weight.copy_(self._unmerged_weight)
            self._unmerged_weight = None


def lora_modules(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def apply_lora(model, config: LoRAConfig):
    """Wrap the target linears of every block in LoRALinear and freeze everything else.
    Returns the model (changed in place)."""
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = 0
    for block in model.blocks:
        for parent in (block.attn, block.mlp):
            for name in config.targets:
                child = getattr(parent, name, None)
                if isinstance(child, nn.Linear):
                    setattr(parent, name, LoRALinear(child, config.rank, config.alpha, config.dropout))
                    wrapped += 1
    if not wrapped:
        raise ValueError(f"no linear layer named {config.targets} found in the model")
    model.lora_config = config
    return model


def merge_lora(model):
    for m in lora_modules(model).values():
        m.merge()


def unmerge_lora(model):
    for m in lora_modules(model).values():
        m.unmerge()


def strip_lora(model):
    """Fold the adapters into the base weights and put plain nn.Linear layers back, so the model saves
    and loads as an ordinary GPT (quark.model.io)."""
    for block in model.blocks:
        for parent in (block.attn, block.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, LoRALinear):
                    child.merge()
                    setattr(parent, name, child.base)
    for p in model.parameters():
        p.requires_grad_(True)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


def adapter_state_dict(model):
    return {f"{name}.{w}": getattr(m, w).detach().contiguous().cpu()
            for name, m in lora_modules(model).items() for w in ("lora_A", "lora_B")}


def save_adapter(model, directory, metadata=None):
    directory = Path(directory)
    state = adapter_state_dict(model)
    if not state:
        raise ValueError("the model has no LoRA adapters to save; call apply_lora first")
    atomic_write_bytes(directory / "adapter.safetensors", save(state, metadata={k: str(v) for k, v in (metadata or {}).items()} or None))
    atomic_write_text(directory / "adapter_config.json", json.dumps(asdict(model.lora_config), indent=1))
    return directory


def read_adapter(directory):
    """A saved adapter directory -> (LoRAConfig, {"blocks.{i}.{attn|mlp}.{target}.lora_A|lora_B": tensor})."""
    directory = Path(directory)
    cfg_path, weights = directory / "adapter_config.json", directory / "adapter.safetensors"
    for p in (cfg_path, weights):
        if not p.exists():
            raise FileNotFoundError(f"{directory} is not a LoRA adapter directory: {p.name} is missing")
    try:
        return from_dict(LoRAConfig, json.loads(cfg_path.read_text()), str(cfg_path)), load_file(weights)
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path} is not valid JSON: {e}") from None
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{weights} is corrupted or truncated: {e}") from None


def load_adapter(model, directory):
    """Apply the adapter saved in `directory` onto `model` (a base GPT of the same config)."""
    config, state = read_adapter(directory)
    weights = Path(directory) / "adapter.safetensors"
    apply_lora(model, config)
    mods = lora_modules(model)
    expected = {f"{n}.{w}" for n in mods for w in ("lora_A", "lora_B")}
    if set(state) != expected:
        raise ValueError(f"{weights} does not fit this model: missing {sorted(expected - set(state))[:3]}, "
                         f"unexpected {sorted(set(state) - expected)[:3]}")
    with torch.no_grad():
        for key, t in state.items():
            name, w = key.rsplit(".", 1)
            param = getattr(mods[name], w)
            if param.shape != t.shape:
                raise ValueError(f"{weights}: {key} has shape {tuple(t.shape)}, the model expects {tuple(param.shape)}")
            param.copy_(t)
    return model
