"""quark.optimize.quantize: quantize_model, quantized model directories, the `quantize` step and CLI."""
import json
import shutil

import numpy as np
import pytest
import torch

from quark.cli import main as cli_main
from quark.config import ConfigError
from quark.model import GPT, GPTConfig, preset
from quark.model.io import save_model
from quark.model.quantized import load_quantized_model, save_quantized_model
from quark.nn import QuantLinear
from quark.optimize import model_nbytes, quantize_model
from quark.optimize.quantize import run_step, validate_config


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return GPT(preset("nano", vocab_size=256, max_seq_len=64)).eval()


@pytest.mark.parametrize("scheme", ["int8", "int4", "w8a8"])
def test_quantize_model_swaps_linears_and_shrinks(scheme):
    model = tiny_model()
    idx = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        ref, _ = model(idx)
    report = quantize_model(model, scheme, 32)
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert linears == ["lm_head"] and report.skipped == {"lm_head": "skipped by request"}
    assert len(report.layers) == 2 * 7 and all(isinstance(model.get_submodule(n), QuantLinear) for n in report.layers)
    assert report.bytes_after < report.bytes_before and report.bytes_after == model_nbytes(model)
    with torch.no_grad():
        out, _ = model(idx)
    assert float((out - ref).norm() / ref.norm()) < 0.2


def test_int4_layers_with_odd_k_are_padded_and_quantizer_hook():
    net = torch.nn.Sequential(torch.nn.Linear(48, 64), torch.nn.Linear(64, 8))
    seen = []

    def quantizer(name, linear):
        from quark.ops import quantize
        seen.append(name)
        return quantize(linear.weight, "int4", 32)

    report = quantize_model(net, "int4", 32, skip=(), quantizer=quantizer)
    assert report.layers == ["0", "1"] and seen == ["0", "1"] and report.skipped == {}
    assert net[0].data.shape == (64, 32)   # in_features 48 padded to 64 (two groups of 32)
    with pytest.raises(ValueError, match="scheme must be one of"):
        quantize_model(net, "fp4")


@pytest.mark.parametrize("d_model,group_size", [(128, 32), (160, 128)])   # 160: padded last groups
def test_save_and_load_quantized_model(tmp_path, d_model, group_size):
    model = tiny_model() if d_model == 128 else GPT(GPTConfig(vocab_size=256, n_layer=1, n_head=5, n_kv_head=5,
                                                             d_model=160, ffn_hidden=448, max_seq_len=64)).eval()
    report = quantize_model(model, "int4", group_size)
    assert report.skipped == {"lm_head": "skipped by request"}
    save_quantized_model(model, tmp_path / "q", report)
    back = load_quantized_model(tmp_path / "q")
    idx = torch.randint(0, 256, (1, 10))
    with torch.no_grad():
        assert torch.equal(back(idx)[0], model(idx)[0])
    assert json.loads((tmp_path / "q" / "quant.json").read_text())["layers"] == report.layers
    blob = (tmp_path / "q" / "model.safetensors").read_bytes()
    (tmp_path / "q" / "model.safetensors").write_bytes(blob[:-64])
    with pytest.raises(ValueError, match="corrupted or truncated"):
        load_quantized_model(tmp_path / "q")


def make_run_dir(tmp_path):
    run = tmp_path / "run"
    save_model(tiny_model(), run / "pretrain" / "final")
    (run / "pack").mkdir(parents=True)
    np.random.default_rng(0).integers(0, 256, 2000).astype(np.uint16).tofile(run / "pack" / "val.bin")
    np.random.default_rng(1).integers(0, 256, 4000).astype(np.uint16).tofile(run / "pack" / "train.bin")  # calibration
    (run / "pack" / "meta.json").write_text(json.dumps({"dtype": "uint16", "vocab_size": 256}))
    return run


def test_pipeline_step_reports_and_resumes(tmp_path):
    run = make_run_dir(tmp_path)
    cfg = {"seed": 0, "eval_tokens": 128, "decode_tokens": 4, "methods": ["rtn", "gptq"], "calib_sequences": 8,
           "calib_seq_len": 32}   # awq runs in tests/test_optimize_awq.py
    stats = run_step(run, cfg)
    for scheme in ("int8", "int4", "int4-gptq"):
        s = stats[scheme]
        assert s["bytes_after"] < s["bytes_before"] and s["perplexity"] > 1 and s["decode_tokens_per_s"] > 0
        assert (run / "quantize" / scheme / "model.safetensors").exists()
        load_quantized_model(run / "quantize" / scheme)
    # random weights: every scheme stays within a few percent of the float perplexity
    assert abs(stats["int8"]["perplexity_delta"]) < 0.05 * stats["float"]["perplexity"]
    mtime = (run / "quantize" / "int4" / "model.safetensors").stat().st_mtime
    again = run_step(run, cfg)
    assert again["int4"]["perplexity"] == stats["int4"]["perplexity"]
    assert (run / "quantize" / "int4" / "model.safetensors").stat().st_mtime == mtime   # resumed, not redone
    report = run / "quantize" / "int4" / "report.json"
    old = json.loads(report.read_text())
    del old["key"]["format"]                                    # as an older format's run left it
    report.write_text(json.dumps(old))
    run_step(run, cfg)
    assert (run / "quantize" / "int4" / "model.safetensors").stat().st_mtime != mtime   # redone in this format
    assert stats["int4-gptq"]["method"] == "gptq" and stats["int4"]["method"] == "rtn"
    # paired comparisons on the same held-out windows: calibrated int4 against fp32 and against int4 RTN
    assert "vs_rtn" in stats["int4-gptq"] and "vs_rtn" not in stats["int4"] and "vs_rtn" not in stats["int8"]
    assert stats["int4"]["vs_float_2se"] > 0
    assert stats["int4"]["vs_float"] == pytest.approx(100 * stats["int4"]["perplexity_delta"]
                                                      / stats["float"]["perplexity"], abs=1e-2)
    table = (run / "quantize" / "table.md").read_text()
    assert "| fp32 |" in table and "| int4 | 32 |" in table and "| int4-gptq | 32 |" in table
    assert "vs int4 RTN" in table and "±" in table


def test_step_quantizes_the_latest_or_the_best_model(tmp_path):
    run = make_run_dir(tmp_path)
    worse = tiny_model()
    with torch.no_grad():
        for p in worse.parameters():
            p.add_(torch.randn_like(p))                        # an "aligned" model far worse on held-out text
    save_model(worse, run / "sft" / "final")
    cfg = {"seed": 0, "eval_tokens": 128, "decode_tokens": 2, "decode_repeats": 1, "schemes": ["int8"]}
    latest = run_step(run, cfg)
    assert latest["source"] == str(run / "sft" / "final") and latest["candidates"] == {}
    best = run_step(run, {**cfg, "model": "best"})
    assert best["source"] == str(run / "pretrain" / "final")
    assert set(best["candidates"]) == {str(run / "sft" / "final"), str(run / "pretrain" / "final")}
    assert best["candidates"][best["source"]] < best["candidates"][str(run / "sft" / "final")]
    assert best["float"]["perplexity"] < latest["float"]["perplexity"]   # re-measured for the new source


def test_step_config_and_input_errors(tmp_path):
    with pytest.raises(ConfigError, match="schemes"):
        validate_config({"schemes": ["int2"]})
    with pytest.raises(ConfigError, match="group_size"):
        validate_config({"group_size": 48})
    with pytest.raises(ConfigError, match="unknown key"):
        validate_config({"bits": 4})
    with pytest.raises(ConfigError, match="methods"):
        validate_config({"methods": ["smoothquant"]})
    run = make_run_dir(tmp_path)
    shutil.copytree(run / "pack", tmp_path / "no-model" / "pack")
    for model in ("latest", "best"):
        with pytest.raises(FileNotFoundError, match="no trained model"):
            run_step(tmp_path / "no-model", {"seed": 0, "model": model})
    (run / "pack" / "meta.json").write_text("{}")
    with pytest.raises(ValueError, match="dtype"):
        run_step(run, {"seed": 0})


def test_cli(tmp_path, capsys):
    """`quark quantize` is the step: any model directory (--model) measured on a run's held-out tokens."""
    save_model(tiny_model(), tmp_path / "m")
    run = make_run_dir(tmp_path)
    small = ["--eval-tokens", "64", "--decode-tokens", "2", "--decode-repeats", "1"]
    assert cli_main(["quantize", "--run-dir", str(run), "--model", str(tmp_path / "m"), "--schemes", "int8",
                     *small]) == 0
    assert json.loads(capsys.readouterr().out)["source"] == str(tmp_path / "m")
    assert isinstance(load_quantized_model(run / "quantize" / "int8").blocks[0].mlp.w1, QuantLinear)
    assert cli_main(["quantize", "--run-dir", str(run), "--model", str(tmp_path / "nothing")]) == 1
    assert "does not exist" in capsys.readouterr().out
    # calibrated: the calibration windows come from the run's pack/train.bin
    assert cli_main(["quantize", "--run-dir", str(run), "--schemes", "int4", "--methods", "gptq",
                     "--calib-sequences", "4", "--calib-seq-len", "16", *small]) == 0
    assert "int4-gptq" in capsys.readouterr().out
    assert json.loads((run / "quantize" / "int4-gptq" / "quant.json").read_text())["calibration"]["sequences"] == 4
    assert cli_main(["quantize", "--run-dir", str(run), "--methods", "smoothquant"]) == 2
    assert "quantize.methods" in capsys.readouterr().out


def test_step_quantizes_an_hf_model_on_text_in_its_own_tokens(tmp_path):
    """An HF checkpoint named in a run packed with another tokenizer: calibration (GPTQ) and held-out
    windows are the run's text in the checkpoint's own tokens; the variants keep its chat files."""
    from quark.chat import TemplateChat
    from quark.rundir import RunDir
    from tests.hf_helpers import make_hf_model, make_packed_run
    run, _ = make_packed_run(tmp_path)
    make_hf_model(tmp_path / "hf", max_position_embeddings=128)
    stats = run_step(run, {"seed": 0, "model": str(tmp_path / "hf"), "schemes": ["int4"], "methods": ["rtn", "gptq"],
                           "eval_tokens": 128, "decode_tokens": 2, "decode_repeats": 1, "calib_sequences": 4,
                           "calib_seq_len": 32})
    assert stats["source"] == str(tmp_path / "hf")
    for name in ("int4", "int4-gptq"):
        assert 1 < stats[name]["perplexity"] < 2 * 320 and stats[name]["bytes_after"] < stats[name]["bytes_before"]
        assert isinstance(RunDir(run).chat(run / "quantize" / name), TemplateChat)
    assert abs(stats["int4"]["perplexity_delta"]) < 0.1 * stats["float"]["perplexity"]
