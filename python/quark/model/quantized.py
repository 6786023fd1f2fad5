"""Quantized model directories: a GPT whose Linear layers are quark.nn.QuantLinear, on disk.

Layout: config.json (GPTConfig), quant.json {scheme, group_size, layers, method,
calibration}, model.safetensors (float tensors + each layer's QuantizedTensor.state(prefix) with its
metadata and CRC; the method and calibration settings in the file metadata too), tokenizer.json when
the source had one.
Written by quark.optimize.quantize, read by quark.model.io.load_model.
"""
import json
from pathlib import Path

from quark.io import atomic_open, atomic_write_json, atomic_write_text
from quark.model.config import load_config
from quark.model.gpt import GPT
from quark.model.hf import copy_tokenizer_files
from quark.nn import QuantLinear
from quark.ops.quant import QuantizedTensor, read_safetensors

MODEL_FORMAT = "quark.quantized_model/2"
READ_MODEL_FORMATS = ("quark.quantized_model/1", MODEL_FORMAT)   # /1: fp32 int4 scales, refused per layer


def set_module(model, name, module):
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def save_quantized_model(model, directory, report, tokenizer_path=None):
    """Write a quantized GPT (after quark.optimize.quantize_model) as a quantized model directory;
    report: its QuantizeReport (scheme, group_size, layers, method, calibration go to quant.json)."""
    from safetensors.torch import save
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    metadata = {"format": MODEL_FORMAT, "method": report.method, "calibration": json.dumps(report.calibration)}
    quantized = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    for name, m in quantized.items():
        t, meta = m.qweight.state(name + ".")
        tensors.update(t)
        metadata.update(meta)
        if m.bias is not None:
            tensors[name + ".bias"] = m.bias.detach().contiguous().cpu()
    for key, value in model.state_dict().items():
        owner = key.rpartition(".")[0]
        if owner not in quantized:
            tensors[key] = value.detach().contiguous().cpu()
    if model.config.tie_embeddings and "lm_head" not in quantized:
        tensors.pop("lm_head.weight", None)   # shares tok_emb.weight; safetensors refuses aliases
    with atomic_open(directory / "model.safetensors") as f:
        f.write(save(tensors, metadata=metadata))
    atomic_write_text(directory / "config.json", model.config.to_json())
    atomic_write_json(directory / "quant.json", {"scheme": report.scheme, "group_size": report.group_size,
                                                  "layers": report.layers, "method": report.method,
                                                  "calibration": report.calibration})
    if tokenizer_path is not None and Path(tokenizer_path).exists():   # with an HF chat template beside it
        copy_tokenizer_files(tokenizer_path, directory)
    return directory


def load_quantized_model(directory):
    """A GPT with QuantLinear layers from a quantized model directory; every layer is checked."""
    directory = Path(directory)
    config = load_config(directory)
    spec_path = directory / "quant.json"
    if not spec_path.exists():
        raise FileNotFoundError(f"{directory} is not a quantized model directory: quant.json is missing")
    try:
        spec = json.loads(spec_path.read_text())
        layers = list(spec["layers"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{spec_path} is malformed ({e}); expected {{scheme, group_size, layers}}") from None
    weights = directory / "model.safetensors"
    tensors, metadata = read_safetensors(weights)
    if metadata.get("format") not in READ_MODEL_FORMATS:
        raise ValueError(f"{weights}: not a Quark quantized model (format {metadata.get('format')!r})")
    model = GPT(config)
    for name in layers:
        try:
            model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{spec_path}: layer {name!r} does not exist in this model") from None
        qt = QuantizedTensor.from_state(tensors, metadata, prefix=name + ".", where=f"{weights} layer {name}")
        set_module(model, name, QuantLinear(qt, tensors.get(name + ".bias")))
    rest = {k: v for k, v in tensors.items() if k.rpartition(".")[0] not in layers}
    missing, unexpected = model.load_state_dict(rest, strict=False)
    missing = [k for k in missing if k.rpartition(".")[0] not in layers
               and not (config.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"{weights} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval()
