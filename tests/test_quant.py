"""quark.ops.quantize / dequantize / qlinear and QuantizedTensor files (csrc/quant, ops/quant.py)."""
import json
import math

import numpy as np
import pytest
import torch

import quark
from quark import _C
from quark._runtime import ISA_LEVELS
from quark.ops import QuantizedTensor, dequantize, qlinear, quantize, reference
from quark.ops import quant
from quark.ops.quant import quantize_activations

AVAILABLE = ISA_LEVELS[:ISA_LEVELS.index(_C.detected_isa()) + 1]   # scalar .. the best this CPU has
GEMM_LEVELS = [lv for lv in AVAILABLE if lv != "scalar"]             # the paths with a blocked GEMM


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def ref64(x, qt, bias=None):
    """float64 dequantize(qt) @ x (+ bias); W8A8 quantizes x first exactly as the kernel does."""
    x2 = x.float().reshape(-1, x.shape[-1])
    if qt.scheme == "w8a8":
        q, s = quantize_activations(x2)
        x2 = q.double() * s.double()[:, None]
    y = x2.double() @ dequantize(qt).double().T
    if bias is not None:
        y = y + bias.double()
    return y.reshape(*x.shape[:-1], qt.shape[0])


@pytest.mark.parametrize("scheme,group,tol", [("int8", 32, 0.01), ("int4", 32, 0.08), ("int4", 64, 0.095),
                                              ("int4", 128, 0.105)])
def test_quantization_error_on_gaussian_weights(scheme, group, tol):
    w = torch.randn(256, 1024, generator=torch.Generator().manual_seed(0))
    err = rel(dequantize(quantize(w, scheme, group)), w)
    assert err < tol


def test_dequantize_inverts_quantize_on_the_grid():
    g = torch.Generator().manual_seed(1)
    qt = quantize(torch.randn(16, 64, generator=g), "int4", 32)
    again = quantize(dequantize(qt), "int4", 32)           # grid points quantize to themselves
    assert rel(dequantize(again), dequantize(qt)) < 1e-6
    q8 = quantize(torch.randn(8, 33, generator=g), "int8")
    assert torch.allclose(dequantize(q8), q8.data.float() * q8.scales[:, None])


def test_int4_packing_layout_and_sizes():
    w = torch.arange(64, dtype=torch.float32).repeat(3, 1) - 30          # distinct values along K
    qt = quantize(w, "int4", 64)
    assert qt.data.shape == (3, 32) and qt.scales.shape == (3, 1) and qt.zeros.shape == (3, 1)
    assert qt.nbytes == 3 * 32 + 3 * 2 + 3                             # bf16 scales
    lo, hi = qt.data[0, :16] & 15, qt.data[0, :16] >> 4                 # byte j: q[j] | q[j + 16] << 4
    q = torch.round(dequantize(qt)[0] / qt.scales[0, 0] + qt.zeros[0, 0].float())
    assert torch.equal(lo.float(), q[:16]) and torch.equal(hi.float(), q[16:32])


@pytest.mark.parametrize("isa", AVAILABLE)
@pytest.mark.parametrize("scheme,group,N,K", [("int8", 0, 37, 101), ("int8", 0, 64, 16), ("int4", 32, 37, 96),
                                              ("int4", 64, 70, 192), ("int4", 128, 33, 256), ("w8a8", 0, 45, 77),
                                              ("w8a8", 0, 40, 130)])
# M: 1-8 rows in one GEMV pass (AVX-512; AVX2 passes of 4), 15 in passes of 8 + 7, 37 past every GEMV limit
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 6, 8, 15, 37])
def test_qlinear_matches_float64_reference(isa, scheme, group, N, K, M):
    g = torch.Generator().manual_seed(N * 1000 + K + M)
    qt = quantize(torch.randn(N, K, generator=g), scheme, group or 32)
    x, bias = torch.randn(M, K, generator=g), torch.randn(N, generator=g)
    with quark.isa(isa):
        y = qlinear(x, qt, bias)
        y0 = qlinear(x, qt)
    assert y.dtype == torch.float32 and y.shape == (M, N)
    assert rel(y, ref64(x, qt, bias)) < 1e-5
    assert rel(y0, ref64(x, qt)) < 1e-5


@pytest.mark.parametrize("scheme", ["int8", "int4", "w8a8"])
def test_every_isa_path_agrees_on_a_larger_gemm(scheme):
    g = torch.Generator().manual_seed(7)
    qt = quantize(torch.randn(300, 512, generator=g), scheme, 32)
    x = torch.randn(70, 512, generator=g)
    ref = ref64(x, qt)
    outs = {}
    for isa in AVAILABLE:
        with quark.isa(isa):
            outs[isa] = qlinear(x, qt)
        assert rel(outs[isa], ref) < 1e-5, isa
    if scheme == "w8a8":   # exact int32 dots and one shared epilogue: bit-identical on every path
        for isa in AVAILABLE:
            assert torch.equal(outs[isa], outs["scalar"])


# Sizes that cross every block edge of the GEMMs: M past the 256-token chunk and off the 16/32-token
# tiles, N past the 256-row task and off the 16-row tiles, K off the 32/64 steps (int8) or across
# several k blocks with a partial last one (int4: blocks of 1024/512/256 on amx).
@pytest.mark.parametrize("isa", GEMM_LEVELS)
@pytest.mark.parametrize("scheme,group,N,K,M", [("int4", 32, 300, 1152, 37), ("int4", 64, 33, 1088, 300),
                                                ("int4", 128, 257, 384, 5), ("int8", 0, 270, 1027, 33),
                                                ("int8", 0, 17, 2100, 300), ("w8a8", 0, 270, 1027, 33),
                                                ("w8a8", 0, 300, 2111, 261)])
def test_gemm_paths_at_block_edges(isa, scheme, group, N, K, M):
    g = torch.Generator().manual_seed(N + K + M)
    qt = quantize(torch.randn(N, K, generator=g), scheme, group or 32)
    x, bias = torch.randn(M, K, generator=g), torch.randn(N, generator=g)
    with quark.isa(isa):
        y = qlinear(x, qt, bias)
    assert rel(y, ref64(x, qt, bias)) < 1e-5
    if scheme == "w8a8":
        with quark.isa("scalar"):
            assert torch.equal(y, qlinear(x, qt, bias))


# The amx path splits fp32 activations into as many exact bf16 parts as they need (1 for bf16 values,
# 2 for fp16-like ones, else 3); every case, at every int4 group (its own unrolled kernel), must stay
# exact up to fp32 rounding.
@pytest.mark.parametrize("isa", GEMM_LEVELS)
@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32", "wide range"])
@pytest.mark.parametrize("scheme,group", [("int4", 32), ("int4", 64), ("int4", 128), ("int8", 0)])
def test_weight_only_gemm_is_exact_for_every_activation_precision(isa, precision, scheme, group):
    g = torch.Generator().manual_seed(11)
    qt = quantize(torch.randn(200, 320, generator=g), scheme, group or 32)
    x = torch.randn(40, 320, generator=g)
    if precision == "bf16":
        x = x.bfloat16().float()
    elif precision == "fp16":
        x = x.half().float()
    elif precision == "wide range":                     # rows from 1e-20 to 1e20
        x = x * torch.logspace(-20, 20, 40)[:, None]
    with quark.isa(isa):
        y = qlinear(x, qt)
    ref = ref64(x, qt)
    row_err = (y.double() - ref).norm(dim=1) / ref.norm(dim=1)
    assert float(row_err.max()) < 1e-5


@pytest.mark.parametrize("isa", GEMM_LEVELS)
@pytest.mark.parametrize("group", [32, 128])
def test_int4_bf16_activations_are_as_precise_as_torch_bf16(isa, group):
    # bf16 in, bf16 out; on amx the GEMM also rounds the dequantized weights to bf16 (bf16 compute).
    g = torch.Generator().manual_seed(group)
    qt = quantize(torch.randn(200, 512, generator=g), "int4", group)
    x, bias = torch.randn(40, 512, generator=g).bfloat16(), torch.randn(200, generator=g)
    with quark.isa(isa):
        y = qlinear(x, qt, bias)
    ref = ref64(x.float(), qt, bias)
    torch_bf16 = torch.nn.functional.linear(x, dequantize(qt).bfloat16(), bias.bfloat16())
    assert y.dtype == torch.bfloat16
    assert rel(y.float(), ref) <= 1.05 * rel(torch_bf16.float(), ref)


@pytest.mark.parametrize("isa", AVAILABLE)
@pytest.mark.parametrize("scheme,group", [("int4", 32), ("int4", 128), ("int8", 0), ("w8a8", 0)])
@pytest.mark.parametrize("M", [1, 3, 37])
def test_bf16_io_in_the_kernels_equals_widening_and_rounding_around_them(isa, scheme, group, M):
    """The kernels read bf16 x and write bf16 out themselves (the amx GEMM natively, every other path
    through fp32 buffers): bit for bit what the fp32 kernel gives on the widened x, rounded by torch.
    Row 0 of x, +-2^e with the signs of weight row 0 (scale 2^-40, no bias), puts out[0, 0] near
    2^-129, below 2^-126, where bf16 rounding must keep it (bf16 has fp32's exponent range); row 1
    holds a NaN."""
    g = torch.Generator().manual_seed(M)
    K = 256 if scheme == "int4" else 200   # int8: a partial last k step
    qt = quantize(torch.randn(70, K, generator=g), scheme, group or 32)
    qt.scales[0] = 2.0 ** -40
    x = torch.randn(M, K, generator=g).bfloat16()
    w0 = dequantize(qt)[0]
    x[0] = 2.0 ** (-129 - math.ceil(math.log2(float(w0.abs().sum())))) * w0.sign()   # out[0, 0] ~ 2^-129
    if M > 1:
        x[1, 5] = float("nan")
    bias = torch.randn(70, generator=g)
    bias[0] = 0.0
    w = _C.PackedWeight(scheme, qt.data, qt.scales, qt.zeros, qt.group_size)
    with quark.isa(isa):
        out32 = torch.empty(M, 70)
        _C.qlinear(x.float(), w, bias, out32, bf16_compute=True)
        out16 = torch.empty(M, 70, dtype=torch.bfloat16)
        _C.qlinear(x, w, bias, out16, bf16_compute=True)
        y = qlinear(x, qt, bias)
    expect = out32.bfloat16()
    assert bool(expect.isnan().any()) == (M > 1)
    for got in (out16, y):   # bits equal, NaN payloads aside (torch writes 0xFFFF, the kernels quiet the NaN)
        assert torch.equal(got.isnan(), expect.isnan())
        assert torch.equal(got.nan_to_num(0.0).view(torch.int16), expect.nan_to_num(0.0).view(torch.int16))
    if not (isa == "amx" and scheme == "int4" and M > 4):   # AMX-BF16 flushes its denormal sums to zero
        assert 0 < abs(float(expect[0, 0])) < 2.0 ** -126


@pytest.mark.parametrize("isa", AVAILABLE)
@pytest.mark.parametrize("scheme,group,K", [("int8", 0, 333), ("int4", 32, 672), ("int4", 64, 704),
                                            ("int4", 128, 640), ("int4", 32, 544), ("int4", 128, 2304)])
def test_threaded_gemv_at_odd_sizes(isa, scheme, group, K):
    """Weights above the GEMV's one-thread cutoff (128 KiB): the threaded row split, blocks whose
    streams each sweep several rows, rows left over after the last full block, K ending in a partial
    128-weight chunk (672, 704, 544; 544 at g32 has 17 groups, one past a 16-lane vector of scales),
    and a g128 row of 18 chunks (2304)."""
    g = torch.Generator().manual_seed(K)
    qt = quantize(torch.randn(1037, K, generator=g), scheme, group or 32)
    assert qt.data.numel() > 1 << 17
    for M in (1, 2, 3, 4):
        x, bias = torch.randn(M, K, generator=g), torch.randn(1037, generator=g)
        with quark.isa(isa):
            y = qlinear(x, qt, bias)
        assert rel(y, ref64(x, qt, bias)) < 1e-5


@pytest.mark.parametrize("isa", AVAILABLE)
@pytest.mark.parametrize("M", [3, 9])
def test_w8a8_nan_in_a_row_makes_that_row_nan(isa, M):
    # int8 activations cannot carry a NaN: the row's scale does, as a float linear would.
    g = torch.Generator().manual_seed(M)
    qt = quantize(torch.randn(40, 96, generator=g), "w8a8")
    x = torch.randn(M, 96, generator=g)
    clean = qlinear(x, qt)
    x[1, 7] = float("nan")
    with quark.isa(isa):
        y = qlinear(x, qt)
    assert bool(y[1].isnan().all())
    rows = [i for i in range(M) if i != 1]
    assert torch.equal(y[rows], clean[rows])


@pytest.mark.parametrize("isa", AVAILABLE)
def test_w8a8_rows_of_tiny_activations_keep_their_values(isa):
    """A row with max |x| below 127 / FLT_MAX (~3.7e-37, denormals included) used to quantize to zeros
    (127 / max|x| overflowed): it is scaled by 2^100 first, in the kernel and in quantize_activations."""
    g = torch.Generator().manual_seed(4)
    qt = quantize(torch.randn(24, 96, generator=g), "w8a8")
    x = torch.randn(6, 96, generator=g)
    x[1] *= 1e-38
    x[2] *= 1e-42                                           # denormal
    q, _ = quantize_activations(x)
    assert torch.equal(q[1], quantize_activations(x[1:2] * 1e38)[0][0])
    assert int(q[2].abs().max()) == 127
    with quark.isa(isa):
        y = qlinear(x, qt)
    ref = ref64(x, qt)
    assert bool((y[1:3] != 0).all())
    assert rel(y[1], ref[1]) < 1e-5
    assert rel(y[2], ref[2]) < 1e-3                        # outputs ~1e-41 are denormal: ~4 digits in fp32
    assert rel(y, ref) < 1e-5


def test_w8a8_gemv_and_gemm_paths_agree_bitwise():
    g = torch.Generator().manual_seed(3)
    qt = quantize(torch.randn(96, 200, generator=g), "w8a8")
    x = torch.randn(9, 200, generator=g)
    full = qlinear(x, qt)
    rows = torch.cat([qlinear(x[i:i + 1], qt) for i in range(9)])
    assert torch.equal(full, rows)


def test_bf16_activations_batched_shapes_and_numpy():
    g = torch.Generator().manual_seed(4)
    qt = quantize(torch.randn(48, 128, generator=g), "int4", 32)
    x = torch.randn(2, 3, 128, generator=g).bfloat16()
    y = qlinear(x, qt)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 3, 48)
    assert rel(y.float(), ref64(x.float(), qt).float()) < 1e-2        # bf16 output rounding
    xn = np.random.default_rng(0).standard_normal((5, 128), dtype=np.float32)
    yn = qlinear(xn, qt)
    assert isinstance(yn, np.ndarray) and rel(torch.from_numpy(yn), ref64(torch.from_numpy(xn), qt)) < 1e-5


def test_reference_qlinear_matches_kernel():
    g = torch.Generator().manual_seed(5)
    for scheme in ("int8", "int4", "w8a8"):
        qt = quantize(torch.randn(20, 64, generator=g), scheme, 32)
        x = torch.randn(6, 64, generator=g)
        assert rel(qlinear(x, qt), reference.qlinear(x, qt)) < 1e-5


def test_reference_dequantize_and_activation_rounding_are_independent_and_agree():
    """The oracle holds its own unpacking and activation rounding (it shares no code with quark.ops.quant);
    both must give the same values bit for bit, padded int4 groups and tiny rows included."""
    g = torch.Generator().manual_seed(6)
    for scheme, K in (("int8", 64), ("w8a8", 64), ("int4", 64), ("int4", 80)):
        qt = quantize(torch.randn(12, K, generator=g), scheme, 32)
        assert torch.equal(reference.dequantize(qt), dequantize(qt))
    x = torch.randn(5, 77, generator=g)
    x[1] *= 1e-38
    x[2] = 0
    for a, b in zip(reference.quantize_activations(x), quantize_activations(x)):
        assert torch.equal(a, b)


def test_bad_inputs_raise_clear_errors():
    qt = quantize(torch.randn(8, 64), "int4", 32)
    with pytest.raises(TypeError, match="x must have dtype"):
        qlinear(torch.randn(2, 64, dtype=torch.float64), qt)
    with pytest.raises(ValueError, match="last dimension K=64"):
        qlinear(torch.randn(2, 63), qt)
    with pytest.raises(ValueError, match="C-contiguous"):
        qlinear(torch.randn(64, 2).T, qt)
    with pytest.raises(ValueError, match="bias must be"):
        qlinear(torch.randn(2, 64), qt, torch.randn(7))
    with pytest.raises(TypeError, match="QuantizedTensor"):
        qlinear(torch.randn(2, 64), torch.randn(8, 64))
    with pytest.raises(ValueError, match="group_size must be one of"):
        quantize(torch.randn(8, 64), "int4", 16)
    with pytest.raises(ValueError, match="scheme must be one of"):
        quantize(torch.randn(8, 64), "int3")
    with pytest.raises(TypeError, match="floating-point"):
        quantize(torch.ones(8, 64, dtype=torch.int32), "int8")
    with pytest.raises(ValueError, match="inf or NaN"):
        quantize(torch.full((2, 32), float("nan")), "int8")
    with pytest.raises(ValueError, match="zeros must have dtype"):
        QuantizedTensor("int4", (8, 64), qt.data, qt.scales, qt.zeros.float(), 32)
    with pytest.raises(ValueError, match="int4 scales must be bfloat16, got float32"):
        QuantizedTensor("int4", (8, 64), qt.data, qt.scales.float(), qt.zeros, 32)
    with pytest.raises(ValueError, match="int4 scales must be bfloat16"):   # the C++ boundary checks too
        _C.PackedWeight("int4", qt.data, qt.scales.float(), qt.zeros, 32)
    with pytest.raises(ValueError, match="zeros must have shape"):
        _C.PackedWeight("int4", qt.data, qt.scales, qt.zeros[:, :1].contiguous(), 32)
    with pytest.raises(ValueError, match="int8 data must be int8"):
        _C.PackedWeight("int8", qt.data, qt.scales, None, 64)
    w = _C.PackedWeight("int4", qt.data, qt.scales, qt.zeros, 32)
    with pytest.raises(ValueError, match="K=64"):
        _C.qlinear(torch.randn(1, 32), w, None, torch.empty(1, 8))
    with pytest.raises(ValueError, match="leading dimensions"):
        _C.qlinear(torch.randn(2, 3, 64), w, None, torch.empty(3, 2, 8))
    x3 = torch.randn(2, 3, 64)                              # the binding reads (..., K) as rows
    out3 = torch.empty(2, 3, 8)
    _C.qlinear(x3, w, None, out3)
    assert rel(out3, ref64(x3, qt)) < 1e-5


@pytest.mark.parametrize("scheme", ["int8", "w8a8", "int4"])
def test_packed_weight_refuses_rows_of_no_columns(scheme):
    # Regression (fuzz): K = 0 passed, and qlinear then divided by the row length / group (SIGFPE).
    if scheme == "int4":
        args = (torch.zeros(3, 0, dtype=torch.uint8), torch.zeros(3, 0, dtype=torch.bfloat16),
                torch.zeros(3, 0, dtype=torch.uint8), 32)
    else:
        args = (torch.zeros(3, 0, dtype=torch.int8), torch.ones(3), None, 0)
    with pytest.raises(ValueError, match=r"at least one column \(K >= 1\)"):
        _C.PackedWeight(scheme, *args)


def test_zero_rows_and_constant_weights():
    w = torch.zeros(4, 64)
    w[1] = 0.5
    for scheme in ("int8", "int4", "w8a8"):
        qt = quantize(w, scheme, 32)
        # 15 steps of a scale 0.5 / 15 rounded to bf16 (2^-8 relative at most) for int4
        assert torch.allclose(dequantize(qt), w, atol=0.5 * 2**-8 if scheme == "int4" else 1e-7)
        y = qlinear(torch.zeros(3, 64), qt)
        assert torch.equal(y, torch.zeros(3, 4))


@pytest.mark.parametrize("isa", AVAILABLE)
@pytest.mark.parametrize("group,K", [(128, 160), (64, 100), (32, 48)])
def test_int4_pads_k_to_whole_groups(tmp_path, isa, group, K):
    """K not a multiple of the group: zero weights pad the last group; its grid comes from the real
    weights alone (the same scale and zero point as quantizing them as a group of their own)."""
    g = torch.Generator().manual_seed(K)
    w = torch.randn(40, K, generator=g)
    qt = quantize(w, "int4", group)
    Kp = -(-K // group) * group
    assert qt.shape == (40, K) and qt.packed_k == Kp
    assert qt.data.shape == (40, Kp // 2) and qt.scales.shape == qt.zeros.shape == (40, Kp // group)
    assert dequantize(qt).shape == (40, K) and rel(dequantize(qt), w) < 0.105   # as whole groups of this size
    tail = K - K % group
    if (K - tail) % 32 == 0:
        alone = quantize(w[:, tail:], "int4", 32)
        assert torch.equal(qt.scales[:, -1], alone.scales[:, 0]) and torch.equal(qt.zeros[:, -1], alone.zeros[:, 0])
    bias = torch.randn(40, generator=g)
    for M in (1, 3, 5, 13):
        x = torch.randn(M, K, generator=g)
        with quark.isa(isa):
            y = qlinear(x, qt, bias)
        assert y.shape == (M, 40) and rel(y, ref64(x, qt, bias)) < 1e-5
    back = QuantizedTensor.load(qt.save(tmp_path / "w.safetensors"))
    assert back.shape == (40, K) and torch.equal(dequantize(back), dequantize(qt))
    with pytest.raises(ValueError, match="scales must have shape"):
        QuantizedTensor("int4", (40, K), qt.data, qt.scales[:, :1], qt.zeros[:, :1], group)


@pytest.mark.parametrize("scheme", ["int8", "int4", "w8a8"])
def test_save_load_roundtrip(tmp_path, scheme):
    qt = quantize(torch.randn(24, 128), scheme, 64)
    path = qt.save(tmp_path / "w.safetensors", metadata={"layer": "mlp.w1"})
    back = QuantizedTensor.load(path)
    assert (back.scheme, back.shape, back.group_size) == (qt.scheme, qt.shape, qt.group_size)
    for name, t in qt.tensors().items():
        assert torch.equal(back.tensors()[name], t)
    x = torch.randn(3, 128)
    assert torch.equal(qlinear(x, back), qlinear(x, qt))


def test_truncated_corrupted_and_foreign_files_fail_clearly(tmp_path):
    from safetensors.torch import save_file
    qt = quantize(torch.randn(16, 64), "int4", 32)
    good = qt.save(tmp_path / "w.safetensors")
    blob = good.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(blob[: len(blob) - 100])
    with pytest.raises(ValueError, match="corrupted or truncated"):
        QuantizedTensor.load(tmp_path / "trunc.safetensors")
    (tmp_path / "header.safetensors").write_bytes(b"\xff" * 8 + blob[8:])
    with pytest.raises(ValueError, match="corrupted or truncated"):
        QuantizedTensor.load(tmp_path / "header.safetensors")
    header_len = int.from_bytes(blob[:8], "little")
    start = 8 + header_len + json.loads(blob[8:8 + header_len])["data"]["data_offsets"][0]
    flipped = bytearray(blob)
    flipped[start + 3] ^= 0x40                              # a packed-weight byte: only the CRC can tell
    (tmp_path / "flip.safetensors").write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="checksum mismatch"):
        QuantizedTensor.load(tmp_path / "flip.safetensors")
    save_file({"weight": torch.randn(4, 4)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a Quark quantized tensor"):
        QuantizedTensor.load(tmp_path / "plain.safetensors")
    with pytest.raises(FileNotFoundError):
        QuantizedTensor.load(tmp_path / "missing.safetensors")
    tensors, meta = qt.state()
    meta["format"] = "quark.quantized_tensor/2"
    meta["shape"] = "16,96"
    save_file(tensors, str(tmp_path / "shape.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="must have shape"):
        QuantizedTensor.load(tmp_path / "shape.safetensors")


def test_format_1_files_load_for_int8_and_are_refused_for_int4(tmp_path):
    """quark.quantized_tensor/1 held int4 scales in fp32; rounding them on load would change the
    weights silently, so such files are refused with a message to re-quantize. int8's layout did not
    change: its /1 files still load."""
    from safetensors.torch import save_file
    for scheme in ("int8", "int4"):
        qt = quantize(torch.randn(16, 64), scheme, 32)
        tensors, meta = qt.state()
        if scheme == "int4":
            tensors["scales"] = tensors["scales"].float()
            meta["crc32"] = str(quant._crc32(tensors))
        save_file(tensors, str(tmp_path / f"{scheme}.safetensors"), metadata={**meta, "format": "quark.quantized_tensor/1"})
        if scheme == "int8":
            assert torch.equal(QuantizedTensor.load(tmp_path / "int8.safetensors").data, qt.data)
        else:
            with pytest.raises(ValueError, match="float32 .*quantized_tensor/1.*re-quantize"):
                QuantizedTensor.load(tmp_path / "int4.safetensors")


def test_kernel_handle_follows_the_tensors_and_copies_drop_it():
    """qlinear imports a QuantizedTensor's arrays once (quant._packed, cached on it): in-place updates
    show through, a replaced tensor rebuilds the handle, and copies and pickles leave it behind."""
    import copy
    import pickle
    g = torch.Generator().manual_seed(5)
    qt = quantize(torch.randn(24, 64, generator=g), "int4", 32)
    x = torch.randn(2, 64, generator=g)
    y = qlinear(x, qt)
    handle = quant._packed(qt)
    assert quant._packed(qt) is handle and handle.shape == (24, 64)
    qt.scales.mul_(2)                                       # in place: same memory
    assert torch.allclose(qlinear(x, qt), 2 * y, rtol=1e-6, atol=1e-6)
    qt.scales = qt.scales / 4                               # replaced: a new handle
    assert quant._packed(qt) is not handle
    assert torch.allclose(qlinear(x, qt), y / 2, rtol=1e-6, atol=1e-6)
    for clone in (copy.deepcopy(qt), pickle.loads(pickle.dumps(qt))):
        assert "_packed" not in clone.__dict__ and torch.equal(qlinear(x, clone), qlinear(x, qt))


def test_negative_views_are_resolved():
    """A tensor with torch's negative-view bit holds -x lazily; DLPack exports its raw memory, so qlinear
    resolves the bit first (it once computed with +x)."""
    g = torch.Generator().manual_seed(6)
    qt = quantize(torch.randn(8, 64, generator=g), "int4", 32)
    x, bias = torch.randn(3, 64, generator=g), torch.randn(8, generator=g)
    xn, bn = torch._neg_view(-x), torch._neg_view(-bias)
    assert xn.is_neg() and bn.is_neg()
    assert torch.equal(qlinear(xn, qt, bn), qlinear(x, qt, bias))
