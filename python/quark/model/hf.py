"""Hugging Face model directories in and out.

In: `load_hf(directory)` builds a GPT from a transformers checkpoint directory (config.json, then
model.safetensors or the shards listed in model.safetensors.index.json) of LlamaForCausalLM (also
SmolLM2, TinyLlama), MistralForCausalLM, Qwen2ForCausalLM or Qwen3ForCausalLM. The weights are read
shard by shard into a model built on the "meta" device, so the peak is about one copy of them, in the
stored dtype unless one is asked for. Anything Quark does not implement (a model_type, a config field
with a non-default value, a tensor without a place) is an error that names it: nothing is ignored,
except what transformers ignores too (a stored rotary inv_freq, the lm_head copy of tied embeddings).
`chat_settings(directory)` reads the chat template, special tokens and eos ids the same way, and
`read_peft(directory)` a PEFT LoRA adapter's tensors under GPT names (quark.infer.lora serves them).

Out: `export_hf(model, out_dir)` writes any GPT as a directory transformers loads with the same
logits (llama, mistral, qwen2 or qwen3, whichever expresses its options), with the tokenizer files,
and `export_peft` writes LoRA adapters as a PEFT adapter directory.

The architectures are the same function: RMSNorm with the weight applied after the fp32
normalisation, rotary embeddings on (first half, second half) pairs (HF's rotate_half), GQA where
query head h reads KV head h // (n_head / n_kv_head), SwiGLU with gate = w1, up = w3, down = w2.
So the mapping is a renaming of tensors, with no permutation.
"""
import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from quark.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from quark.model.config import GPTConfig, config_from_hf
from quark.model.gpt import GPT
from quark.model.lora import TARGETS

# Quark module -> HF module inside layer i (parameters keep their suffix, weight or bias), and globals.
LAYER_MODULES = {
    "attn_norm": "input_layernorm", "attn.wq": "self_attn.q_proj", "attn.wk": "self_attn.k_proj",
    "attn.wv": "self_attn.v_proj", "attn.wo": "self_attn.o_proj", "attn.q_norm": "self_attn.q_norm",
    "attn.k_norm": "self_attn.k_norm", "mlp_norm": "post_attention_layernorm", "mlp.w1": "mlp.gate_proj",
    "mlp.w3": "mlp.up_proj", "mlp.w2": "mlp.down_proj",
}
GLOBAL_NAMES = {"tok_emb.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
                "lm_head.weight": "lm_head.weight"}
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM"}
# Tokenizer-side files of an HF directory, copied along with tokenizer.json when a model is saved.
TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "generation_config.json")
# Quark's own chat template (quark.chat) in Jinja, written into exports of Quark-trained models.
QUARK_CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                       "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def to_hf_name(name):
    if name in GLOBAL_NAMES:
        return GLOBAL_NAMES[name]
    _, i, rest = name.split(".", 2)            # blocks.{i}.{module}.{weight|bias}
    module, param = rest.rsplit(".", 1)
    return f"model.layers.{i}.{LAYER_MODULES[module]}.{param}"


def from_hf_name(name):
    """The GPT name of an HF tensor name, or None when it has no place in a GPT."""
    inverse = {v: k for k, v in GLOBAL_NAMES.items()}
    if name in inverse:
        return inverse[name]
    parts = name.split(".")
    modules = {v: k for k, v in LAYER_MODULES.items()}
    if len(parts) < 5 or parts[:2] != ["model", "layers"] or ".".join(parts[3:-1]) not in modules:
        return None
    return f"blocks.{parts[2]}.{modules['.'.join(parts[3:-1])]}.{parts[-1]}"


def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def is_hf_dir(directory):
    """True when directory's config.json is a transformers config (it has a model_type)."""
    path = Path(directory) / "config.json"
    return path.exists() and "model_type" in read_json(path)


def read_hf_config(directory) -> GPTConfig:
    path = Path(directory) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{directory} is not a Hugging Face model directory: config.json is missing")
    return config_from_hf(read_json(path), str(path))


# ---- weights ----------------------------------------------------------------------------------------

def _weight_files(directory):
    """[(path, names the index puts in it or None)] of model.safetensors or the indexed shards."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError("weight_map is empty")
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{index} is malformed ({e}); expected {{metadata, weight_map}}") from None
        files = {}
        for name, file in weight_map.items():
            files.setdefault(file, set()).add(name)
        for file in files:
            if not (directory / file).exists():
                raise FileNotFoundError(f"{directory / file} is missing (listed in {index.name})")
        return [(directory / f, names) for f, names in sorted(files.items())]
    if (directory / "model.safetensors").exists():
        return [(directory / "model.safetensors", None)]
    other = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt*"))
    raise FileNotFoundError(f"{directory}: model.safetensors (or model.safetensors.index.json) is missing"
                            + (f"; {other[0]} is a pickle, which Quark never loads: convert it to safetensors"
                               if other else ""))


def load_hf(directory, device="cpu", dtype=None) -> GPT:
    """A GPT with the weights of a Hugging Face directory, on `device`, in the stored dtype unless `dtype`."""
    directory = Path(directory)
    cfg = read_hf_config(directory)
    files = _weight_files(directory)
    with torch.device("meta"):   # no memory until the stored tensors are assigned
        model = GPT(cfg)
    expected = {to_hf_name(n): (n, t.shape) for n, t in model.state_dict().items()
                if not (cfg.tie_embeddings and n == "lm_head.weight")}
    seen = set()
    for path, listed in files:
        part = {}
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                keys = set(f.keys())
                if listed is not None and listed - keys:
                    raise ValueError(f"{path}: tensor {sorted(listed - keys)[0]} listed in the index is not in the file")
                for key in sorted(keys):
                    if key not in expected:
                        if key.endswith("rotary_emb.inv_freq") or (cfg.tie_embeddings and key == "lm_head.weight"):
                            continue   # recomputed / tied, as transformers does
                        raise ValueError(f"{path}: tensor {key} has no place in this {cfg.n_layer}-layer model")
                    name, shape = expected[key]
                    t = f.get_tensor(key)
                    if t.shape != shape:
                        raise ValueError(f"{path}: tensor {key} has shape {tuple(t.shape)}, config.json implies "
                                         f"{tuple(shape)}")
                    dtype = dtype or t.dtype   # the stored dtype of the first tensor, for all of them
                    part[name] = t.to(device=device, dtype=dtype)
                    seen.add(key)
        except SafetensorError as e:
            raise ValueError(f"{path} is corrupted or truncated: {e}") from None
        model.load_state_dict(part, strict=False, assign=True)
    missing = sorted(set(expected) - seen)
    if missing:
        raise ValueError(f"{directory}: tensor {missing[0]} is missing" + (f" (and {len(missing) - 1} more)"
                                                                           if len(missing) > 1 else ""))
    if cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    model.init_rope(device)
    return model.eval()


# ---- chat settings --------------------------------------------------------------------------------

def _token_text(t):
    return t.get("content") if isinstance(t, dict) else t


def chat_settings(directory):
    """{"template", "special_tokens", "eos_ids"} of an HF directory's tokenizer files, or None when it
    has no chat template. The template comes from chat_template.jinja, else tokenizer_config.json
    (a named list: the "default" one); special tokens (bos_token, eos_token, ...) from
    tokenizer_config.json, as transformers passes them to the template; eos ids from
    generation_config.json, else config.json."""
    directory = Path(directory)
    tok_cfg = read_json(directory / "tokenizer_config.json") if (directory / "tokenizer_config.json").exists() else {}
    if (directory / "chat_template.jinja").exists():
        template = (directory / "chat_template.jinja").read_text()
    else:
        template = tok_cfg.get("chat_template")
        if isinstance(template, list):
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            if "default" not in named:
                raise ValueError(f"{directory}/tokenizer_config.json: chat templates {sorted(named)} have no 'default'")
            template = named["default"]
    if not template:
        return None
    special = {}
    for key in ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"):
        if _token_text(tok_cfg.get(key)) is not None:
            special[key] = _token_text(tok_cfg[key])
    eos = None
    for name in ("generation_config.json", "config.json"):
        if (directory / name).exists():
            eos = read_json(directory / name).get("eos_token_id")
            if eos is not None:
                break
    eos_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return {"template": template, "special_tokens": special, "eos_ids": eos_ids}


# ---- out: HF and PEFT directories -----------------------------------------------------------------

def hf_config(cfg: GPTConfig, bos_id=None, eos_id=None, dtype="float32"):
    """The transformers config of a GPTConfig: the one architecture among ARCHITECTURES whose options
    it uses (ValueError when none has them all)."""
    attn_bias = cfg.qkv_bias and cfg.o_bias
    if cfg.qk_norm:
        kind, ok = "qwen3", cfg.qkv_bias == cfg.o_bias and not (cfg.mlp_bias or cfg.sliding_window)
    elif cfg.qkv_bias and not cfg.o_bias:
        kind, ok = "qwen2", not (cfg.mlp_bias or cfg.sliding_window)
    elif cfg.sliding_window:
        kind, ok = "mistral", not (cfg.qkv_bias or cfg.o_bias or cfg.mlp_bias)
    else:
        kind, ok = "llama", cfg.qkv_bias == cfg.o_bias
    if not ok:
        raise ValueError(f"no Hugging Face architecture has this combination of options: qkv_bias={cfg.qkv_bias}, "
                         f"o_bias={cfg.o_bias}, mlp_bias={cfg.mlp_bias}, qk_norm={cfg.qk_norm}, "
                         f"sliding_window={cfg.sliding_window}")
    scaling = dict(cfg.rope_scaling or {"rope_type": "default"})
    max_pos = cfg.max_seq_len
    if scaling["rope_type"] == "dynamic":
        max_pos = scaling.pop("original_max_position_embeddings")
    c = {
        "architectures": [ARCHITECTURES[kind]], "model_type": kind,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.ffn_hidden,
        "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head,
        "head_dim": cfg.head_dim, "max_position_embeddings": max_pos, "rms_norm_eps": cfg.norm_eps,
        # transformers < 5 reads rope_theta (+ rope_scaling), >= 5 rope_parameters: write both.
        "rope_theta": cfg.rope_theta, "rope_parameters": {**scaling, "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu", "attention_dropout": 0.0,
        "initializer_range": cfg.init_std, "bos_token_id": bos_id, "eos_token_id": eos_id,
        "torch_dtype": dtype, "dtype": dtype,
    }
    if cfg.rope_scaling:
        c["rope_scaling"] = scaling
    if kind == "llama":
        c.update(attention_bias=attn_bias, mlp_bias=cfg.mlp_bias)
    elif kind == "mistral":
        c["sliding_window"] = cfg.sliding_window
    else:
        c.update(use_sliding_window=False, sliding_window=None)
        if kind == "qwen3":
            c["attention_bias"] = attn_bias
    return c


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


def copy_tokenizer_files(tokenizer_path, directory):
    """Copy tokenizer.json and, when it sits in an HF directory, that directory's TOKENIZER_FILES
    (chat template, special tokens, eos ids) into `directory`. True when HF files were copied."""
    src, directory = Path(tokenizer_path), Path(directory)
    if src.resolve() != (directory / "tokenizer.json").resolve():
        shutil.copyfile(src, directory / "tokenizer.json")
    copied = False
    for name in TOKENIZER_FILES:
        if (src.parent / name).exists():
            copied = True
            if (src.parent / name).resolve() != (directory / name).resolve():
                shutil.copyfile(src.parent / name, directory / name)
    return copied


def _hf_state(model: GPT, dtype):
    """HF-named tensors of a GPT (LoRA layers merged, quantized layers dequantized), without the tied head."""
    from quark.model.lora import LoRALinear
    from quark.nn import QuantLinear
    with torch.device("meta"):
        plain = GPT(model.config).state_dict()   # the names of a plain GPT of this config
    state = {}
    for name in plain:
        if name == "lm_head.weight" and model.config.tie_embeddings:
            continue   # HF re-ties it from embed_tokens (tie_word_embeddings)
        path, param = name.rsplit(".", 1)
        module = model.get_submodule(path)
        if isinstance(module, LoRALinear):
            t = module.base.bias if param == "bias" else module.base.weight + (0 if module.merged else module.delta_weight())
        elif isinstance(module, QuantLinear):
            t = module.bias if param == "bias" else module.qweight.dequantize()
        else:
            t = getattr(module, param)
        state[to_hf_name(name)] = t.detach().to(dtype).contiguous().cpu()
    return state


def export_hf(model: GPT, out_dir, tokenizer_path=None, dtype=torch.float32, max_shard_bytes=None):
    """Write model as a Hugging Face checkpoint directory (sharded above max_shard_bytes); returns it.
    LoRA layers are exported merged and quantized layers dequantized."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = _hf_state(model, dtype)
    write_safetensors(state, out, max_shard_bytes)
    bos, eos = _special_ids(tokenizer_path)
    cfg = hf_config(model.config, bos, eos, str(dtype).removeprefix("torch."))
    if tokenizer_path is not None and not copy_tokenizer_files(tokenizer_path, out):
        # A Quark tokenizer: its chat template in Jinja, and generation stops at <|end|> or <|eos|>.
        end = {t["content"]: t["id"] for t in read_json(tokenizer_path).get("added_tokens", [])}.get("<|end|>")
        atomic_write_json(out / "tokenizer_config.json", {
            "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>", "eos_token": "<|eos|>",
            "pad_token": "<|pad|>", "model_max_length": model.config.max_seq_len, "chat_template": QUARK_CHAT_TEMPLATE})
        atomic_write_json(out / "generation_config.json", {
            "bos_token_id": bos, "eos_token_id": [i for i in (end, eos) if i is not None]})
    elif tokenizer_path is not None and (out / "generation_config.json").exists():
        cfg["eos_token_id"] = read_json(out / "generation_config.json").get("eos_token_id", cfg["eos_token_id"])
    atomic_write_json(out / "config.json", cfg)
    return out


def write_safetensors(state, out, max_shard_bytes=None, metadata=None):
    """model.safetensors, or model-0000k-of-0000n.safetensors + model.safetensors.index.json when the
    tensors exceed max_shard_bytes (whole tensors per file, in order), each written atomically."""
    metadata = {"format": "pt", **(metadata or {})}
    files, size = [[]], 0
    for name, t in state.items():
        n = t.numel() * t.element_size()
        if max_shard_bytes and files[-1] and size + n > max_shard_bytes:
            files.append([])
            size = 0
        files[-1].append(name)
        size += n
    if len(files) == 1:
        atomic_write_bytes(out / "model.safetensors", save(state, metadata=metadata))
        return
    weight_map = {}
    for k, names in enumerate(files):
        file = f"model-{k + 1:05d}-of-{len(files):05d}.safetensors"
        atomic_write_bytes(out / file, save({n: state[n] for n in names}, metadata=metadata))
        weight_map.update(dict.fromkeys(names, file))
    total = sum(t.numel() * t.element_size() for t in state.values())
    atomic_write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": total},
                                                              "weight_map": weight_map})


def export_peft(model: GPT, out_dir, base_model_name_or_path=None):
    """Write the LoRA adapters of a GPT (quark.model.lora) as a PEFT directory (adapter_config.json +
    adapter_model.safetensors) that peft's PeftModel.from_pretrained loads onto the HF export of the
    base. Quark's A (r, in) and B (out, r) with scale alpha / r are PEFT's lora_A / lora_B weights."""
    from quark.model.lora import lora_modules
    mods = lora_modules(model)
    if not mods:
        raise ValueError("the model has no LoRA adapters to export; load them with quark.model.lora.load_adapter")
    lcfg = model.lora_config
    state = {}
    for name, m in mods.items():
        prefix = "base_model.model." + to_hf_name(f"{name}.weight").removesuffix(".weight")
        state[f"{prefix}.lora_A.weight"] = m.lora_A.detach().float().contiguous().cpu()
        state[f"{prefix}.lora_B.weight"] = m.lora_B.detach().float().contiguous().cpu()
    targets = sorted({LAYER_MODULES[f"{p}.{t}"].split(".")[1] for t in lcfg.targets for p in ("attn", "mlp")
                      if f"{p}.{t}" in LAYER_MODULES})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "adapter_model.safetensors", save(state, metadata={"format": "pt"}))
    atomic_write_text(out / "adapter_config.json", json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": lcfg.rank, "lora_alpha": lcfg.alpha, "lora_dropout": lcfg.dropout, "target_modules": targets,
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "inference_mode": True, "modules_to_save": None, "init_lora_weights": True,
        "rank_pattern": {}, "alpha_pattern": {}}, indent=1))
    return out


# PEFT options whose non-default values change what the adapter computes: Quark runs plain LoRA only.
PEFT_PLAIN = {"peft_type": "LORA", "use_dora": False, "fan_in_fan_out": False, "bias": "none", "modules_to_save": None,
              "layers_pattern": None, "lora_bias": False, "trainable_token_indices": None}
# PEFT's target module names -> Quark's LoRA targets (q_proj -> wq, ..., down_proj -> w2)
PEFT_TARGETS = {LAYER_MODULES[f"{p}.{t}"].split(".")[1]: t for t in TARGETS for p in ("attn", "mlp")
                if f"{p}.{t}" in LAYER_MODULES}


def read_peft(directory):
    """A PEFT LoRA directory (adapter_config.json + adapter_model.safetensors, as peft's save_pretrained and
    export_peft write it) -> {GPT module name: (A (r, in), B (out, r), scale, (A's name, B's name) in the
    file)}. scale is lora_alpha / r (/ sqrt(r) with use_rslora), per module with rank_pattern and
    alpha_pattern as peft resolves them. A config option Quark does not run (DoRA, trained biases, saved
    modules), a target without a place in a GPT, a rank other than the config's, or a missing half of a
    pair is an error naming it."""
    directory = Path(directory)
    cfg_path, weights = directory / "adapter_config.json", directory / "adapter_model.safetensors"
    for p in (cfg_path, weights):
        if not p.exists():
            raise FileNotFoundError(f"{directory} is not a PEFT adapter directory: {p.name} is missing")
    cfg = read_json(cfg_path)
    for key, plain in PEFT_PLAIN.items():
        value = cfg.get(key, plain)
        if value != plain and not (plain is None and not value):   # None, [] and {} all mean "none"
            raise ValueError(f"{cfg_path}: {key}={value!r} is not supported (Quark serves plain LoRA: {key}={plain!r})")
    targets = cfg.get("target_modules")
    if isinstance(targets, list):   # a string is a regular expression over module names, checked by the tensors
        targets = {t.rsplit(".", 1)[-1] for t in targets}   # a name or a full module path
        bad = sorted(t for t in targets if t not in PEFT_TARGETS)
        if bad:
            raise ValueError(f"{cfg_path}: target module {bad[0]!r} has no LoRA place in Quark (it runs LoRA on "
                             f"{', '.join(sorted(PEFT_TARGETS))})")
    try:
        state = load_file(weights)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{weights} is corrupted or truncated: {e}") from None
    r, alpha = cfg.get("r", 8), cfg.get("lora_alpha", 8)

    def pattern(patterns, module, default):   # peft's get_pattern_key: the first key matching a name suffix
        key = next((k for k in patterns or {} if re.match(rf"(.*\.)?({k})$", module)), None)
        return default if key is None else patterns[key]

    pairs = {}
    for name in state:
        m = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])\.weight", name)
        gpt = from_hf_name(m.group(1) + ".weight") if m else None
        if gpt is None or gpt.split(".")[-2] not in TARGETS:
            raise ValueError(f"{weights}: tensor {name} has no place in a LoRA adapter of a GPT "
                             "(expected base_model.model.model.layers.N.<module>.lora_A|lora_B.weight)")
        pairs.setdefault(gpt.removesuffix(".weight"), {})[m.group(2)] = (name, m.group(1))
    out = {}
    for module, ab in sorted(pairs.items()):
        if len(ab) < 2:
            (half, (name, _)), = ab.items()
            raise ValueError(f"{weights}: tensor {name} has no lora_{'B' if half == 'A' else 'A'} partner")
        (name_a, hf_module), (name_b, _) = ab["A"], ab["B"]
        rank = pattern(cfg.get("rank_pattern"), hf_module, r)
        a, b = state[name_a], state[name_b]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise ValueError(f"{weights}: tensors {name_a} {tuple(a.shape)} and {name_b} {tuple(b.shape)} are not a "
                             f"rank-{rank} pair (adapter_config.json r / rank_pattern)")
        lora_alpha = pattern(cfg.get("alpha_pattern"), hf_module, alpha)
        scale = lora_alpha / (rank ** 0.5 if cfg.get("use_rslora") else rank)
        out[module] = (a, b, scale, (name_a, name_b))
    if isinstance(targets, set):   # modules excluded by name (exclude_modules) may be missing
        found = {LAYER_MODULES[m.split(".", 2)[2]].split(".")[1] for m in out}
        if not found <= targets or (found != targets and not cfg.get("exclude_modules")):
            raise ValueError(f"{cfg_path}: target_modules {sorted(targets)} but {weights.name} holds adapters for "
                             f"{sorted(found)}")
    return out
