"""Quark's kernels inside a transformers model the user already has (the Liger-Kernel way):

    model = AutoModelForCausalLM.from_pretrained(path)
    quark.patch(model)                                  # attention and decode GEMVs on Quark's kernels
    quark.quantize_(model, scheme="int4", group_size=32)   # nn.Linear -> QuantLinear, in place
    model.generate(...)

patch registers "quark" in transformers' AttentionInterface and switches the model to it: prefill
runs quark.ops.attention (C++ on CPU, Triton on CUDA) and each cached decode step
quark.ops.decode_attention over the cache. Anything those kernels do not express (a padding or
sliding-window mask that is not empty, attention dropout, soft-capping, a dtype the device's kernel
lacks) goes to transformers' own SDPA path, so outputs never change meaning. The linear layers become
QuarkLinear, whose forward is quark.ops.linear: the streaming fp32 or bf16 GEMV at decode-sized row
counts on CPU (for a bf16 model it streams W at the memory's rate, where torch's bf16 matmul widens W
in a compute-bound loop) and torch's F.linear everywhere else. transformers is imported only when these functions run.
"""
import torch
import torch.nn as nn

from quark import ops
from quark.nn.quant_linear import QuantLinear
from quark.ops.quant import GROUP_SIZES, SCHEMES, quantize

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
_KERNEL_DTYPES = {"cpu": (torch.float32, torch.bfloat16), "cuda": (torch.float32, torch.float16, torch.bfloat16)}


class QuarkLinear(nn.Linear):
    """nn.Linear whose forward is quark.ops.linear (same parameters, same state_dict)."""

    def forward(self, x):
        return ops.linear(x, self.weight, self.bias)


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None, **kwargs):
    """transformers' attention-function signature: q (B, H, Sq, D), k/v (B, Hkv, Sk, D) with the cache
    already appended -> ((B, Sq, H, D), None). The causal mask aligns the last query with the last key."""
    B, _, Sq, _ = query.shape
    Sk = key.shape[2]
    if (attention_mask is not None or dropout or kwargs.get("softcap") or kwargs.get("output_attentions")
            or (sliding_window and Sk > sliding_window) or not getattr(module, "is_causal", True)
            or query.dtype not in _KERNEL_DTYPES.get(query.device.type, ())):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      sliding_window=sliding_window, **kwargs)
    key, value = key.contiguous(), value.contiguous()
    if Sq == 1:
        lengths = torch.full((B,), Sk, dtype=torch.int32)
        out = ops.decode_attention(query[:, :, 0].contiguous(), key, value, lengths, scale=scaling)[:, :, None]
    else:
        out = ops.attention(query.contiguous(), key, value, causal=True, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def _check_model(model):
    config = getattr(model, "config", None)
    if not isinstance(model, nn.Module) or getattr(config, "model_type", None) not in MODEL_TYPES:
        raise TypeError(f"quark.patch expects a transformers {', '.join(MODEL_TYPES)} model, got "
                        f"{type(model).__name__} (model_type {getattr(config, 'model_type', None)!r})")


def patch(model):
    """Swap Quark's attention (prefill and cached decode) and linear kernels into a transformers
    Llama / Mistral / Qwen2 / Qwen3 model, in place; returns the model. Same outputs (to kernel
    rounding), model.generate() included."""
    _check_model(model)
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionInterface.register("quark", _attention)
    AttentionMaskInterface.register("quark", sdpa_mask)   # None when causal alone suffices: our kernels
    model.set_attn_implementation("quark")
    for m in model.modules():
        if type(m) is nn.Linear:
            m.__class__ = QuarkLinear
    return model


def is_skipped(name, skip):
    """Whether layer `name` is one of `skip`: a full name or a name suffix ("lm_head", "attn.wq")."""
    return any(name == s or name.endswith("." + s) for s in skip)


def quantize_(model, scheme="int4", group_size=32, skip=("lm_head",), quantizer=None):
    """Replace every nn.Linear of `model` (any nn.Module: a transformers model or a Quark GPT) by a
    QuantLinear of `scheme` ("int8", "int4", "w8a8"), in place; returns the names replaced. `skip`:
    names or name suffixes kept in float (the output head by default, the layer most sensitive to
    quantization). quantizer(name, linear) -> QuantizedTensor replaces round-to-nearest
    (quark.optimize's AWQ / GPTQ hook)."""
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    if scheme == "int4" and group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {group_size!r}")
    replaced = []
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Linear) and not is_skipped(name, skip):
            qt = quantizer(name, m) if quantizer else quantize(m.weight, scheme, group_size)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child,
                    QuantLinear(qt, m.bias).to(m.weight.device))
            replaced.append(name)
    if not replaced:
        raise ValueError("the model has no nn.Linear layer to quantize")
    return replaced
