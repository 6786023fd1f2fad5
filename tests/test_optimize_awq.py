"""quark.optimize.awq: activation-aware scaling (folded exactly into the float model) and clipping."""
import copy

import pytest
import torch

from quark.ops import dequantize, quantize
from quark.optimize.awq import awq_model, output_error, search_clip, search_scale
from quark.optimize.calibration import load_calibration
from quark.optimize.quantize import quantize_calibrated
from tests._train_util import make_run_dir
from tests.test_optimize_gptq import outlier_model


def test_scaling_is_folded_exactly():
    """With clipping off, AWQ only moves scale between norms / wv / w3 and the next layers: the float
    model (GQA: nano has 4 query heads on 2 KV heads) computes the same logits."""
    model = outlier_model()
    scaled = copy.deepcopy(model)
    calib = torch.randint(0, 256, (16, 32), generator=torch.Generator().manual_seed(0))
    info = awq_model(scaled, calib, 32, clip=False)
    assert set(info["alpha"]) == {f"blocks.{b}.{g}" for b in range(2) for g in ("qkv", "o", "mlp", "down")}
    assert any(a > 0 for a in info["alpha"].values())                 # some layers were actually rescaled
    assert not torch.equal(scaled.blocks[0].attn_norm.weight, model.blocks[0].attn_norm.weight)
    test = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(scaled(test)[0], model(test)[0], rtol=1e-4, atol=1e-4)


def moments(x):
    return x.T @ x / len(x), x.abs().mean(0)


def test_output_error_is_the_mean_over_tokens():
    torch.manual_seed(0)
    x, e = torch.randn(300, 48, dtype=torch.float64), torch.randn(16, 48, dtype=torch.float64)
    assert output_error(e, moments(x)[0]) == pytest.approx(float(((x @ e.T) ** 2).mean()), rel=1e-10)


def test_search_scale_never_worse_than_rtn():
    torch.manual_seed(0)
    x = torch.randn(256, 64)
    x[:, :3] *= 20                                                     # salient input channels
    w = torch.randn(32, 64) * 0.1
    s, alpha, rtn_loss, loss = search_scale(*moments(x), [w], 32)
    assert s.shape == (64,) and loss <= rtn_loss and alpha > 0
    assert float(s[:3].mean()) > float(s[3:].mean())                   # the salient channels are scaled up
    rtn_direct = float(((x @ (dequantize(quantize(w, "int4", 32)) - w).T) ** 2).mean())
    assert abs(rtn_loss - rtn_direct) < 1e-4 * rtn_direct               # alpha = 0 is exactly RTN


def test_search_clip_lowers_output_error():
    torch.manual_seed(0)
    w = torch.randn(16, 64) * 0.05
    w[:, 7] = 1.0                                                       # a large weight stretching each group's range
    x = torch.randn(128, 64)
    x[:, 7] = 0.01                                                      # ... on an input that barely fires
    before = float(((x @ (dequantize(quantize(w, "int4", 32)) - w).T) ** 2).mean())
    clipped = w.clone()
    frac = search_clip(clipped, moments(x)[0], 32)
    after = float(((x @ (dequantize(quantize(clipped, "int4", 32)) - w).T) ** 2).mean())
    assert frac < 1.0 and after < 0.5 * before


def test_awq_model_beats_rtn_on_calibration_from_a_run_dir(tmp_path):
    run = make_run_dir(tmp_path, vocab_size=256, train_tokens=20_000, val_tokens=1_000)
    calib = load_calibration(run, 16, 32, seed=0)
    assert calib.shape == (16, 32) and calib.dtype == torch.int64
    assert torch.equal(calib, load_calibration(run, 16, 32, seed=0))          # the seed fixes the windows
    model = outlier_model()
    test = load_calibration(run, 4, 64, seed=1)
    with torch.no_grad():
        ref = model(test)[0]
    errors = {}
    for method in ("rtn", "awq"):
        m = copy.deepcopy(model)
        report = quantize_calibrated(m, method, calib, 32)
        with torch.no_grad():
            errors[method] = float((m(test)[0] - ref).norm() / ref.norm())
    assert report.calibration["error_vs_rtn"] < 1 and 0.5 <= report.calibration["clip_fraction"] <= 1
    assert errors["awq"] < 0.9 * errors["rtn"]
