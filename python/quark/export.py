"""`quark export PATH --format hf|peft|gguf --out DIR`: Quark's models in the formats other tools load.

  hf    any model directory (trained, fine-tuned, sharded, quantized -> dequantized, or HF) -> a
        Hugging Face directory that transformers loads with the same logits; a LoRA adapter directory
        (sft's run_dir/sft/adapter) with --base is merged into its base first
  peft  a LoRA adapter directory with --base -> a PEFT directory (adapter_config.json +
        adapter_model.safetensors) that peft's PeftModel.from_pretrained loads onto the base; a base
        that is not an HF directory is exported beside it (DIR/base) and named in adapter_config.json
  gguf  any model directory -> DIR/model-<type>.gguf for llama.cpp (Q8_0 by default, Q4_0 for int4
        models), with the tokenizer and chat template
"""
import argparse
from pathlib import Path

import torch

from quark.config import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def configure_parser(parser: argparse.ArgumentParser):
    from quark.model.gguf import QTYPES
    parser.add_argument("path", help="a model directory, or a LoRA adapter directory (adapter.safetensors) with --base")
    parser.add_argument("--format", required=True, choices=("hf", "peft", "gguf"), help="what to write")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--base", default=None, help="the base model directory of a LoRA adapter")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="hf: tensor dtype")
    parser.add_argument("--max-shard-mb", type=float, default=None, help="hf: shard the weights into files of this size")
    parser.add_argument("--gguf-type", choices=QTYPES, default=None,
                        help="gguf: tensor type (default: q4_0 for int4 models, q8_0 otherwise)")


def _tokenizer(directory):
    path = Path(directory) / "tokenizer.json"
    return path if path.exists() else None


def export(path, fmt, out, base=None, dtype="float32", max_shard_mb=None, gguf_type=None):
    """Run one export; returns what was written (a directory or the .gguf file)."""
    from quark.model.hf import export_hf, export_peft, is_hf_dir
    from quark.model.io import load_model
    from quark.model.lora import load_adapter
    path, out = Path(path), Path(out)
    is_adapter = (path / "adapter.safetensors").exists()
    if fmt == "peft" and not is_adapter:
        raise ValueError(f"--format peft exports a LoRA adapter directory (adapter.safetensors, e.g. run_dir/sft/adapter); "
                         f"{path} is not one")
    if is_adapter and base is None:
        raise ValueError(f"{path} is a LoRA adapter: give its base model directory with --base")
    source = Path(base) if is_adapter else path
    model = load_adapter(load_model(source), path) if is_adapter else load_model(source)
    tokenizer = _tokenizer(source)
    if fmt == "hf":
        return export_hf(model, out, tokenizer, DTYPES[dtype], int(max_shard_mb * 1e6) if max_shard_mb else None)
    if fmt == "peft":
        base_dir = source.resolve()
        if not is_hf_dir(source):
            base_dir = export_hf(load_model(source), out / "base", tokenizer).resolve()
        return export_peft(model, out, base_model_name_or_path=str(base_dir))
    return _gguf(model, source, out, tokenizer, gguf_type)


def _gguf(model, source, out, tokenizer, qtype):
    from quark.model.gguf import export_gguf
    from quark.model.hf import QUARK_CHAT_TEMPLATE, chat_settings
    from quark.nn import QuantLinear
    if qtype is None:
        schemes = {m.scheme for m in model.modules() if isinstance(m, QuantLinear)}
        qtype = "q4_0" if "int4" in schemes else "q8_0"
    settings = chat_settings(source)
    if settings is not None:
        template, eos = settings["template"], (settings["eos_ids"] or [None])[0]
    else:
        template, eos = QUARK_CHAT_TEMPLATE, None
        if tokenizer is not None:   # Quark's template: stop at <|end|>
            from tokenizers import Tokenizer
            tok = Tokenizer.from_file(str(tokenizer))
            eos = tok.token_to_id("<|end|>")
    return export_gguf(model, out / f"model-{qtype}.gguf", qtype, tokenizer, template, eos_id=eos)


def run_cli(args):
    try:
        written = export(args.path, args.format, args.out, args.base, args.dtype, args.max_shard_mb, args.gguf_type)
    except (FileNotFoundError, ValueError, KeyError, ConfigError) as e:
        print(f"error: {e}")
        return 2
    print(f"wrote {written}")
    return 0
