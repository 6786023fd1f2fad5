"""Model directories: model.safetensors + config.json (GPTConfig) [+ tokenizer.json].

Every step that produces a model writes one of these (run_dir/<step>/final/), and every step that
consumes one loads it here: a Quark directory, its sharded or quantized forms, or a Hugging Face
directory (config.json with a model_type; quark.model.hf); which directory a run's "latest" or "best"
model is, is quark.rundir's business. safetensors only: nothing is ever unpickled.
"""
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file

from quark.io import atomic_dir
from quark.model.config import load_config
from quark.model.gpt import GPT
from quark.model.hf import copy_tokenizer_files, is_hf_dir, load_hf
from quark.model.quantized import load_quantized_model
from quark.model.shard import load_state

def weight_files(directory):
    """The safetensors files holding a model directory's weights: model.safetensors, or an HF
    checkpoint's shards (what a content hash or a modification time of the weights covers)."""
    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{directory} holds no *.safetensors weights")
    return files


def save_model(model: GPT, directory, tokenizer_path=None, metadata=None):
    """Write the model directory as a whole (quark.io.atomic_dir): weights, config and tokenizer
    of one save, never the weights of a new model beside the config of an old one. Without
    tokenizer_path the directory keeps the tokenizer.json it has; other files it held are gone."""
    directory = Path(directory)
    if tokenizer_path is None and (directory / "tokenizer.json").is_file():
        tokenizer_path = directory / "tokenizer.json"
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)   # shared with tok_emb.weight; safetensors refuses aliases
    with atomic_dir(directory) as tmp:
        (tmp / "model.safetensors").write_bytes(_serialize(state, {k: str(v) for k, v in (metadata or {}).items()}))
        (tmp / "config.json").write_text(model.config.to_json())
        if tokenizer_path is not None:   # copied before the swap, with an HF checkpoint's chat files beside it
            copy_tokenizer_files(tokenizer_path, tmp)
    return directory


def _serialize(state, metadata):
    from safetensors.torch import save
    return save(state, metadata=metadata or None)


def load_model(directory, device="cpu", dtype=None) -> GPT:
    """A GPT from a model directory: model.safetensors, Hugging Face style shards
    (model.safetensors.index.json, quark.model.shard), a quantized model (quant.json,
    quark.model.quantized; its QuantLinear layers run the int8/int4 kernels), or a Hugging Face
    directory (quark.model.hf; kept in its stored dtype unless `dtype` is given)."""
    directory = Path(directory)
    if is_hf_dir(directory):
        return load_hf(directory, device, dtype)
    config = load_config(directory)
    if (directory / "quant.json").exists():
        model = load_quantized_model(directory)
        return (model.to(dtype) if dtype is not None else model).to(device).eval()
    weights = directory / "model.safetensors"
    if not weights.exists() and (directory / "model.safetensors.index.json").exists():
        weights, state = directory / "model.safetensors.index.json", load_state(directory)
    elif not weights.exists():
        raise FileNotFoundError(f"{directory} is not a model directory: model.safetensors is missing")
    else:
        try:
            state = load_file(weights)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{weights} is corrupted or truncated: {e}") from None
    model = GPT(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (config.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"{weights} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if dtype is not None:
        model = model.to(dtype)
    return model.to(device).eval()
