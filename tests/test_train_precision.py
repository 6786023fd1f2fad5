"""quark.train.precision: "auto" precision follows the device, and the matmul FLOP/s ceiling."""
import torch

import quark
from quark.train.precision import measure_peak_flops, resolve_precision


def test_auto_precision_follows_the_cpu():
    native = quark.info()["cpu_features"]["avx512_bf16"] or quark.info()["cpu_features"]["amx_bf16"]
    assert resolve_precision("auto", torch.device("cpu")) == ("bfloat16" if native else "float32")
    assert resolve_precision("float32", torch.device("cpu")) == "float32"


def test_peak_flops_is_measured_once_per_device_dtype_and_threads():
    peak = measure_peak_flops()
    assert peak > 1e9                                  # any CPU that runs the tests does a GFLOP/s in fp32
    assert measure_peak_flops() == peak                # cached: training logs and plans share one figure
