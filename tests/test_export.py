"""`quark export`: HF directories transformers loads with equal logits, PEFT directories peft loads onto
the base with equal logits, GGUF files read back with gguf's reader (names, shapes, types, values)."""
import json

import numpy as np
import pytest
import torch

from quark.cli import main
from quark.model.hf import load_hf
from quark.model.io import load_model
from quark.model.lora import LoRAConfig, apply_lora, save_adapter
from tests.hf_helpers import VOCAB, make_hf_model

transformers = pytest.importorskip("transformers")


def _rel(a, b):
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max())


def _adapter(model, directory, targets=("wq", "wv", "w1")):
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0, targets=list(targets)))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.05)
    save_adapter(model, directory)
    return model


def test_export_hf_of_quark_quantized_model(tmp_path, tiny_model_dir):
    from quark.model.quantized import save_quantized_model
    from quark.optimize.quantize import quantize_model
    model = load_model(tiny_model_dir)
    report = quantize_model(model, "int8")
    save_quantized_model(model, tmp_path / "q", report, tiny_model_dir / "tokenizer.json")
    assert main(["export", str(tmp_path / "q"), "--format", "hf", "--out", str(tmp_path / "hf"),
                 "--max-shard-mb", "0.05"]) == 0
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    assert "{{ bos_token }}" in json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())["chat_template"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    x = torch.randint(0, model.config.vocab_size, (2, 19))
    with torch.no_grad():
        assert _rel(hf(x).logits, model(x)[0]) < 1e-4
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert text == "<|bos|><|user|>hi<|end|><|assistant|>"   # Quark's template, in Jinja for transformers


def test_lora_on_hf_model_to_peft_and_merged_hf(tmp_path):
    peft = pytest.importorskip("peft")
    make_hf_model(tmp_path / "base", "llama")
    model = _adapter(load_model(tmp_path / "base"), tmp_path / "adapter")
    assert main(["export", str(tmp_path / "adapter"), "--format", "peft", "--base", str(tmp_path / "base"),
                 "--out", str(tmp_path / "peft")]) == 0
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["gate_proj", "q_proj", "v_proj"] and config["r"] == 4
    base = transformers.AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"], dtype=torch.float32)
    x = torch.randint(0, VOCAB, (2, 13))
    with torch.no_grad():
        plain = base(x).logits
        adapted = peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()(x).logits
        ours = model(x)[0]
    assert _rel(adapted, plain) > 1e-3 and _rel(ours, adapted) < 1e-4
    assert main(["export", str(tmp_path / "adapter"), "--format", "hf", "--base", str(tmp_path / "base"),
                 "--out", str(tmp_path / "merged")]) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    with torch.no_grad():
        assert _rel(merged(x).logits, ours) < 1e-4
    assert (tmp_path / "merged" / "chat_template.jinja").exists()   # the checkpoint's own template travels


def test_peft_export_of_quark_base_exports_the_base(tmp_path, tiny_model_dir):
    peft = pytest.importorskip("peft")
    model = _adapter(load_model(tiny_model_dir), tmp_path / "adapter", targets=("wk", "wo", "w2"))
    assert main(["export", str(tmp_path / "adapter"), "--format", "peft", "--base", str(tiny_model_dir),
                 "--out", str(tmp_path / "peft")]) == 0
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((tmp_path / "peft" / "base").resolve())
    base = transformers.AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"], dtype=torch.float32)
    x = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        assert _rel(model(x)[0], peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()(x).logits) < 1e-4


def test_export_errors(tmp_path, tiny_model_dir, capsys):
    assert main(["export", str(tiny_model_dir), "--format", "peft", "--out", str(tmp_path / "o")]) == 2
    assert "is not one" in capsys.readouterr().out
    save_adapter(apply_lora(load_model(tiny_model_dir), LoRAConfig()), tmp_path / "a")
    assert main(["export", str(tmp_path / "a"), "--format", "hf", "--out", str(tmp_path / "o")]) == 2
    assert "give its base model directory with --base" in capsys.readouterr().out


@pytest.mark.parametrize("kind,scheme,qtype", [("llama", "int8", "q8_0"), ("llama", "int4", "q4_0"),
                                               ("qwen3", "int4", "q4_0"), ("qwen2", None, "q4_1")])
def test_gguf_round_trip(tmp_path, kind, scheme, qtype):
    gguf = pytest.importorskip("gguf")
    from quark.model.gguf import permute_qk
    from quark.model.quantized import save_quantized_model
    from quark.optimize.quantize import quantize_model
    make_hf_model(tmp_path / "hf", kind)
    model = load_hf(tmp_path / "hf")
    source = tmp_path / "hf"
    if scheme:   # a quantized Quark model fine-tuned from the checkpoint
        report = quantize_model(model, scheme, 32)
        source = save_quantized_model(model, tmp_path / "q", report, tmp_path / "hf" / "tokenizer.json")
    args = ["export", str(source), "--format", "gguf", "--out", str(tmp_path / "g")]
    assert main(args + ([] if scheme else ["--gguf-type", qtype])) == 0
    reader = gguf.GGUFReader(str(tmp_path / "g" / f"model-{qtype}.gguf"))
    fields = {name: f.contents() for name, f in reader.fields.items() if not name.startswith("GGUF.")}
    arch = "llama" if kind == "llama" else kind
    assert fields["general.architecture"] == arch and fields[f"{arch}.block_count"] == 2
    assert fields[f"{arch}.attention.head_count_kv"] == 2 and fields["tokenizer.ggml.tokens"][2] == "<|im_end|>"
    assert fields["tokenizer.ggml.eos_token_id"] == 2 and "<|im_start|>" in fields["tokenizer.chat_template"]
    tensors = {t.name: t for t in reader.tensors}
    expected = {"token_embd.weight", "output_norm.weight", "output.weight"} | {
        f"blk.{i}.{n}.weight" for i in range(2) for n in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                                                           "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")}
    if kind == "qwen2":
        expected |= {f"blk.{i}.attn_{n}.bias" for i in range(2) for n in "qkv"}
    if kind == "qwen3":
        expected |= {f"blk.{i}.attn_{n}_norm.weight" for i in range(2) for n in "qk"}
    assert set(tensors) == expected
    gtype = getattr(gguf.GGMLQuantizationType, qtype.upper())
    for name, module in (("blk.1.attn_k.weight", model.blocks[1].attn.wk),
                         ("blk.0.ffn_down.weight", model.blocks[0].mlp.w2)):
        t = tensors[name]
        weight = (module.qweight.dequantize() if scheme else module.weight).detach().float().numpy()
        if arch == "llama" and "attn_k" in name:
            weight = permute_qk(weight, 2)
        assert t.tensor_type == gtype and list(t.shape) == [weight.shape[1], weight.shape[0]]   # GGML: (in, out)
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        assert np.array_equal(values, gguf.quants.dequantize(gguf.quants.quantize(weight, gtype), gtype))
        step = np.abs(weight).max() / (127 if qtype == "q8_0" else 7)
        assert np.abs(values - weight).max() <= step   # within a quantization step of the model's weights
    norm = tensors["blk.0.ffn_norm.weight"]
    assert norm.tensor_type == gguf.GGMLQuantizationType.F32
    assert np.array_equal(norm.data, model.blocks[0].mlp_norm.weight.detach().numpy())
