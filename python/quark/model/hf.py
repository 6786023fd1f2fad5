"""Hugging Face Llama interop: export a GPT to a directory that transformers' LlamaForCausalLM loads
(config.json, model.safetensors, tokenizer.json), and import such a directory back into a GPT.

The architectures are the same function: RMSNorm with the weight applied after the fp32
normalisation, rotary embeddings on (first half, second half) pairs (HF's rotate_half), GQA where
query head h reads KV head h // (n_head / n_kv_head), SwiGLU with gate = w1, up = w3, down = w2.
So the mapping is a renaming of tensors, with no permutation.
"""
import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from quark.io import atomic_write_json
from quark.model.config import GPTConfig
from quark.model.gpt import GPT

# quark name -> HF name, for layer i ({i}) and the global tensors.
LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.w1.weight": "mlp.gate_proj.weight",
    "mlp.w3.weight": "mlp.up_proj.weight",
    "mlp.w2.weight": "mlp.down_proj.weight",
}
GLOBAL_NAMES = {"tok_emb.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
                "lm_head.weight": "lm_head.weight"}


def to_hf_name(name):
    if name in GLOBAL_NAMES:
        return GLOBAL_NAMES[name]
    _, i, rest = name.split(".", 2)            # blocks.{i}.{rest}
    return f"model.layers.{i}.{LAYER_NAMES[rest]}"


def hf_config(cfg: GPTConfig, bos_id=None, eos_id=None, dtype="float32"):
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.ffn_hidden,
        "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head,
        "head_dim": cfg.head_dim, "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        # transformers < 5 reads rope_theta, >= 5 rope_parameters: write both.
        "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu", "attention_bias": False,
        "mlp_bias": False, "attention_dropout": 0.0, "initializer_range": cfg.init_std,
        "bos_token_id": bos_id, "eos_token_id": eos_id, "torch_dtype": dtype, "dtype": dtype,
    }


def _special_ids(tokenizer_path):
    """(bos, eos) ids of the contract's <|bos|>/<|eos|> tokens in a tokenizer.json, if present."""
    if tokenizer_path is None or not Path(tokenizer_path).exists():
        return None, None
    try:
        added = json.loads(Path(tokenizer_path).read_text()).get("added_tokens", [])
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None, None
    ids = {t.get("content"): t.get("id") for t in added if isinstance(t, dict)}
    return ids.get("<|bos|>"), ids.get("<|eos|>")


def export_hf(model: GPT, out_dir, tokenizer_path=None, dtype=torch.float32):
    """Write model as a Hugging Face Llama checkpoint directory; returns the directory."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    state = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue   # HF re-ties it from embed_tokens (tie_word_embeddings)
        state[to_hf_name(name)] = t.detach().to(dtype).contiguous().cpu()
    tmp = out / ".model.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.replace(out / "model.safetensors")
    bos, eos = _special_ids(tokenizer_path)
    atomic_write_json(out / "config.json", hf_config(cfg, bos, eos, str(dtype).removeprefix("torch.")))
    if tokenizer_path is not None:
        shutil.copyfile(tokenizer_path, out / "tokenizer.json")
        atomic_write_json(out / "tokenizer_config.json", {
            "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>", "eos_token": "<|eos|>",
            "pad_token": "<|pad|>", "model_max_length": cfg.max_seq_len})
    return out


def _read_config(directory):
    path = directory / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{directory} is not a Hugging Face model directory: config.json is missing")
    try:
        c = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if c.get("model_type") != "llama":
        raise ValueError(f"{path}: model_type is {c.get('model_type')!r}; only 'llama' can be imported")
    for key, ok in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if c.get(key, ok) != ok:
            raise ValueError(f"{path}: {key}={c[key]!r} is not supported (Quark's GPT needs {ok!r})")
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"{path}: rope scaling {rope.get('rope_type', rope.get('type'))!r} is not supported")
    d, heads = c["hidden_size"], c["num_attention_heads"]
    if c.get("head_dim", d // heads) != d // heads:
        raise ValueError(f"{path}: head_dim {c['head_dim']} != hidden_size / num_attention_heads is not supported")
    return GPTConfig(vocab_size=c["vocab_size"], n_layer=c["num_hidden_layers"], n_head=heads,
                     n_kv_head=c.get("num_key_value_heads", heads), d_model=d, ffn_hidden=c["intermediate_size"],
                     max_seq_len=c.get("max_position_embeddings", 2048),
                     rope_theta=float(rope.get("rope_theta", c.get("rope_theta", 10000.0))),
                     norm_eps=c.get("rms_norm_eps", 1e-5), tie_embeddings=bool(c.get("tie_word_embeddings", False)),
                     init_std=c.get("initializer_range", 0.02))


def _read_weights(directory):
    """All tensors of model.safetensors, or of the shards listed in model.safetensors.index.json."""
    index = directory / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    state = {}
    for name in files:
        path = directory / name
        if not path.exists():
            raise FileNotFoundError(f"{directory}: {name} is missing (only safetensors weights can be imported)")
        try:
            state.update(load_file(str(path)))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path} is corrupted or truncated: {e}") from None
    return state


def import_hf(directory, dtype=torch.float32) -> GPT:
    """A GPT with the weights of a Hugging Face Llama directory (safetensors)."""
    directory = Path(directory)
    cfg = _read_config(directory)
    hf_state = _read_weights(directory)
    model = GPT(cfg)
    state = {}
    for name in model.state_dict():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        hf_name = to_hf_name(name)
        if hf_name not in hf_state:
            raise ValueError(f"{directory}: tensor {hf_name} is missing")
        state[name] = hf_state[hf_name].to(torch.float32)
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["tok_emb.weight"]
    model.load_state_dict(state)
    return model.to(dtype).eval()
