"""quark.optimize.gptq: second-order int4 quantization of one layer and of a whole model."""
import copy
import json

import pytest
import torch

from quark.model import GPT, preset
from quark.model.io import load_model
from quark.nn import QuantLinear
from quark.ops import dequantize, qlinear, quantize
from quark.model.quantized import save_quantized_model
from quark.optimize.gptq import gptq_quantize
from quark.optimize.quantize import quantize_calibrated


def correlated_inputs(n, K, seed=0):
    """Activations with a few dominant directions and uneven channel scales, as in trained models."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(8, K, generator=g)
    return (torch.randn(n, 8, generator=g) @ basis + 0.1 * torch.randn(n, K, generator=g)) * \
        torch.linspace(0.2, 3.0, K)[torch.randperm(K, generator=g)]


def outlier_model(seed=0):
    """A nano GPT whose norms amplify a few channels (activation outliers, which RTN handles badly)."""
    torch.manual_seed(seed)
    m = GPT(preset("nano", vocab_size=256, max_seq_len=64)).eval()
    with torch.no_grad():
        for blk in m.blocks:
            blk.attn_norm.weight[:4] *= 8
            blk.mlp_norm.weight[:4] *= 8
    return m


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size,K", [(32, 256), (128, 256), (128, 160)])   # 160: a padded last group
def test_gptq_layer_beats_rtn_on_output_error(group_size, K, act_order):
    torch.manual_seed(1)
    N = 48
    w = torch.randn(N, K) * 0.05
    x = correlated_inputs(512, K)
    h = x.T @ x / len(x)
    qt, loss = gptq_quantize(w, h, group_size, act_order=act_order)
    rtn = quantize(w, "int4", group_size)
    assert qt.scheme == "int4" and qt.group_size == group_size and qt.shape == (N, K) and loss > 0
    assert qt.data.shape == rtn.data.shape and qt.scales.shape == rtn.scales.shape
    err_gptq = float((x @ (dequantize(qt) - w).T).norm())
    err_rtn = float((x @ (dequantize(rtn) - w).T).norm())
    assert err_gptq < 0.8 * err_rtn
    # the packed result runs in the int4 kernel exactly as its dequantized weights
    torch.testing.assert_close(qlinear(x[:5], qt), x[:5] @ dequantize(qt).T, rtol=1e-4, atol=1e-4)


def test_act_order_keeps_static_groups_and_helps_on_uneven_inputs():
    """act_order permutes only the processing order: every group keeps the scale / zero point round-to-
    nearest gives the unmodified weights, and codes land in the layer's own column order."""
    torch.manual_seed(2)
    N, K, g = 32, 128, 32
    w = torch.randn(N, K) * 0.05
    x = correlated_inputs(512, K, seed=3)
    h = x.T @ x / len(x)
    qt, _ = gptq_quantize(w, h, g, act_order=True)
    rtn = quantize(w, "int4", g)
    torch.testing.assert_close(qt.scales, rtn.scales)
    assert torch.equal(qt.zeros, rtn.zeros)
    # an identity Hessian has nothing to compensate along: GPTQ is then exactly round-to-nearest, in any order
    plain, _ = gptq_quantize(w, torch.eye(K), g, act_order=True, damp=1e-6)
    assert torch.equal(dequantize(plain), dequantize(rtn))
    errs = [float((x @ (dequantize(gptq_quantize(w, h, g, act_order=a)[0]) - w).T).norm()) for a in (False, True)]
    assert errs[1] < errs[0]


def test_gptq_dead_inputs_and_errors():
    w = torch.randn(8, 64)
    x = torch.randn(100, 64)
    x[:, 5] = 0                      # an input that never fires: its weight is zeroed, H stays invertible
    qt, _ = gptq_quantize(w, x.T @ x / 100, 32)
    assert float(dequantize(qt)[:, 5].abs().max()) < float(qt.scales.max())
    with pytest.raises(ValueError, match="hessian must have shape"):
        gptq_quantize(w, torch.eye(32), 32)


def test_gptq_model_beats_rtn_and_round_trips(tmp_path):
    model = outlier_model()
    calib = torch.randint(0, 256, (32, 64), generator=torch.Generator().manual_seed(0))
    test = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(test)[0]
    errors = {}
    for method in ("rtn", "gptq"):
        m = copy.deepcopy(model)
        report = quantize_calibrated(m, method, calib, 32, calib_info={"source": "test"})
        assert report.method == method and len(report.layers) == 14 and "lm_head" in report.skipped
        with torch.no_grad():
            errors[method] = float((m(test)[0] - ref).norm() / ref.norm())
        if method == "gptq":
            assert report.calibration == {"sequences": 32, "seq_len": 64, "source": "test", "act_order": True,
                                          "damp": 0.01}
            save_quantized_model(m, tmp_path / "q", report)
            spec = json.loads((tmp_path / "q" / "quant.json").read_text())
            assert spec["method"] == "gptq" and spec["calibration"]["sequences"] == 32
            back = load_model(tmp_path / "q")          # what `quark serve` calls
            assert isinstance(back.blocks[0].attn.wq, QuantLinear)
            with torch.no_grad():
                assert torch.equal(back(test)[0], m(test)[0])
    assert errors["gptq"] < 0.85 * errors["rtn"]


def test_calibration_must_fit_the_model():
    model = outlier_model()
    with pytest.raises(ValueError, match="vocab_size"):
        quantize_calibrated(model, "gptq", torch.full((2, 8), 300), 32)
    with pytest.raises(ValueError, match="max_seq_len"):
        quantize_calibrated(model, "gptq", torch.zeros(2, 65, dtype=torch.long), 32)
    with pytest.raises(ValueError, match="method must be one of"):
        quantize_calibrated(model, "smoothquant", torch.zeros(2, 8, dtype=torch.long), 32)
