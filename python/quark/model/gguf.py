"""GGUF out: any GPT (float, LoRA-merged or quantized) as a llama.cpp model file, written with the
gguf package (https://github.com/ggml-org/llama.cpp/tree/master/gguf-py).

Tensors are named and laid out as llama.cpp's convert_hf_to_gguf.py writes them: "llama" (also for
Mistral-shaped models) with q/k rows permuted from HF's rotate-half pairs to GGML's interleaved ones,
"qwen2" and "qwen3" as stored. Matrices are stored in `qtype` (Q8_0, Q4_0, Q4_1, F16, F32), quantized
by gguf from the model's float weights (a quantized Quark model's dequantized ones: GGML's blocks of
32 have their own scales, so int4 / int8 layers are re-quantized); norms and biases stay F32, as do
matrices whose rows are not a multiple of the block. llama3 rope scaling becomes the rope_freqs
tensor; dynamic NTK scaling has no GGUF form and is refused. The tokenizer (byte-level BPE
tokenizer.json) goes in as tokens, types and merges, padded with unused tokens to vocab_size.
"""
import json
import os
from pathlib import Path

import numpy as np
import torch

from quark.model.gpt import GPT, rope_inv_freq
from quark.model.hf import _hf_state, hf_config

QTYPES = ("q8_0", "q4_0", "q4_1", "f16", "f32")
# HF module -> llama.cpp tensor inside blk.{i}
_LAYER = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
          "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
          "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
          "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}


def gguf_name(hf_name):
    if hf_name in _GLOBAL:
        return _GLOBAL[hf_name]
    _, _, i, rest = hf_name.split(".", 3)       # model.layers.{i}.{module}.{weight|bias}
    module, param = rest.rsplit(".", 1)
    return f"blk.{i}.{_LAYER[module]}.{param}"


def permute_qk(w, n_head):
    """HF rotate-half rows -> GGML interleaved rope rows (convert_hf_to_gguf.py LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tokenizer(writer, tokenizer_path, vocab_size):
    import gguf
    tok = json.loads(Path(tokenizer_path).read_text())
    model = tok.get("model", {})
    if model.get("type") != "BPE":
        raise ValueError(f"{tokenizer_path}: only BPE tokenizers go into GGUF, got {model.get('type')!r}")
    ids = {**model["vocab"], **{t["content"]: t["id"] for t in tok.get("added_tokens", [])}}
    if max(ids.values()) >= vocab_size:
        raise ValueError(f"{tokenizer_path} has ids up to {max(ids.values())}, beyond the model's vocab_size {vocab_size}")
    special = {t["id"] for t in tok.get("added_tokens", []) if t.get("special")}
    by_id = {i: t for t, i in ids.items()}
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    types = [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL if i in by_id
             else gguf.TokenType.UNUSED for i in range(vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)


def export_gguf(model: GPT, path, qtype="q8_0", tokenizer_path=None, chat_template=None, eos_id=None, bos_id=None):
    """Write `model` as the GGUF file `path` (atomically); returns the path."""
    import gguf
    if qtype not in QTYPES:
        raise ValueError(f"qtype must be one of {QTYPES}, got {qtype!r}")
    cfg = model.config
    kind = hf_config(cfg)["model_type"]
    arch = "llama" if kind in ("llama", "mistral") else kind
    scaling = cfg.rope_scaling or {}
    if scaling.get("rope_type") == "dynamic":
        raise ValueError("dynamic NTK rope scaling has no GGUF form (llama.cpp has linear, yarn and llama3 rope_freqs)")
    gtype = getattr(gguf.GGMLQuantizationType, qtype.upper())
    block = gguf.GGML_QUANT_SIZES[gtype][0]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    w = gguf.GGUFWriter(str(tmp), arch)
    w.add_name(path.stem)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.d_model)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(cfg.ffn_hidden)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_kv_head)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(getattr(gguf.LlamaFileType, "ALL_F32" if qtype == "f32" else f"MOSTLY_{qtype.upper()}"))
    if cfg.sliding_window:
        w.add_sliding_window(cfg.sliding_window)
    if scaling.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(scaling["factor"])
    if tokenizer_path is not None:
        _tokenizer(w, tokenizer_path, cfg.vocab_size)
    for name, tid in (("bos", bos_id), ("eos", eos_id)):
        if tid is not None:
            getattr(w, f"add_{name}_token_id")(tid)
    if chat_template:
        w.add_chat_template(chat_template)
    if scaling.get("rope_type") == "llama3":   # llama.cpp divides the base frequencies by these factors
        factors = rope_inv_freq(cfg.head_dim, cfg.rope_theta) / rope_inv_freq(cfg.head_dim, cfg.rope_theta, scaling)
        w.add_tensor("rope_freqs.weight", factors.numpy().astype(np.float32))
    for hf_name, t in _hf_state(model, torch.float32).items():
        a = t.numpy()
        if arch == "llama" and (".q_proj." in hf_name or ".k_proj." in hf_name):
            a = permute_qk(a, cfg.n_head if ".q_proj." in hf_name else cfg.n_kv_head)
        if a.ndim == 2 and qtype != "f32" and a.shape[1] % block == 0:
            w.add_tensor(gguf_name(hf_name), gguf.quants.quantize(a, gtype), raw_dtype=gtype)
        else:
            w.add_tensor(gguf_name(hf_name), a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path
