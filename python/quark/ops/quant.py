"""Weight quantization and the quantized linear op (C++ kernels in csrc/quant).

Schemes (a QuantizedTensor of weights W (N, K) = (out_features, in_features)):
  "int8"  symmetric per output channel: W ~ q * s[n], q int8 in [-127, 127].
  "int4"  asymmetric per group of `group_size` (32, 64, 128) along K: W ~ (q - z) * s, q and the zero
          point z in [0, 15], two values per byte in blocks of 32 (see csrc/quant/qlinear.h), s in
          bfloat16: fp32's range at half the bytes, and a decode step's GEMV time is its bytes (g32:
          19 bytes per 32 weights instead of 21). The codes are chosen for the rounded scale, so the
          bf16 rounding (2^-8 relative at most) only stretches the grid: beside the half-step rounding
          error, a group's extremes can land at most 15 * 2^-8 ~ 0.06 of a step off.
          When K is not a multiple of group_size, the packed tensors are padded with zero weights to
          Kp = K rounded up to the group (data (N, Kp/2), scales and zeros (N, Kp/G)): the last group
          holds K % G real weights, and its scale and zero point are chosen from those alone (zero is
          always on the grid, so the padding rounds exactly and adds no error). The shape stays (N, K);
          dequantize drops the padding and qlinear pads x with zeros to Kp for the kernels.
  "w8a8"  int8 weights as above, and qlinear also quantizes activations per row (token) to int8
          (scale max|x|/127) so the dot products run in exact int32 (VNNI vpdpbusd where present).

Scales are chosen by round-to-nearest (RTN) with a small clipping search per row / group: among a
few shrink factors of the min/max range, keep the one with the lowest squared error (as llama.cpp's
k-quants do). Calibrated methods (AWQ, GPTQ) can build on `quantize_rtn` by passing their own scales.

qlinear(x, qt, bias) computes x @ dequantize(qt).T + bias exactly up to fp32 rounding for "int8"
and "int4" with fp32 x, with a streaming GEMV for decode-sized M (up to 8 rows with AMX, 16 with
AVX2, 32 with AVX-512) and a blocked GEMM above (AMX tiles where present). bf16 x is widened to fp32
(exactly, inside the kernels) and the result rounded back to bf16 (to nearest even, as torch rounds);
it is the one inexact mode: for "int4" with more than 5 rows on the amx path, the dequantized
weights are rounded to bf16 too (bf16 compute, like torch's bf16 linear on dequantize(qt)), since the
exact form needs an fp32 scaling pass per group that halves the speed. Its error stays within that of torch's bf16 linear.

Files: QuantizedTensor.save/load use safetensors with the scheme, shape, group size and a CRC32 of
the payload in the metadata, so a truncated or corrupted file fails with an error naming the problem
instead of loading garbage. Format /2 has bf16 int4 scales; /1 files (fp32 int4 scales) are refused
with a message to re-quantize, since rounding their scales would change the weights silently.
"""
import zlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.dlpack import to_dlpack

from quark import _C
from quark.io import atomic_write_bytes
from quark.ops import triton as triton_ops
from quark.ops._checks import check_array, device_of

SCHEMES = ("int8", "int4", "w8a8")
GROUP_SIZES = (32, 64, 128)
FORMAT = "quark.quantized_tensor/2"
READ_FORMATS = ("quark.quantized_tensor/1", FORMAT)   # /1 differs in int4 scales only: _validate names it
_CLIP_SHRINK = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)   # candidate fractions of the min/max range


class QuantizedTensor:
    """Packed quantized weights of shape (N, K): data, scales, zeros (int4 only), scheme, group size."""

    def __init__(self, scheme, shape, data, scales, zeros=None, group_size=None):
        self.scheme = scheme
        self.shape = tuple(int(s) for s in shape)
        self.data, self.scales, self.zeros = data, scales, zeros
        self.group_size = int(group_size) if scheme == "int4" else self.shape[1]
        _validate(self, "QuantizedTensor")

    @property
    def out_features(self):
        return self.shape[0]

    @property
    def in_features(self):
        return self.shape[1]

    @property
    def packed_k(self):
        """K as the packed tensors hold it: K rounded up to the group for int4, else K."""
        return padded_k(self.shape[1], self.group_size) if self.scheme == "int4" else self.shape[1]

    @property
    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def tensors(self):
        out = {"data": self.data, "scales": self.scales}
        if self.zeros is not None:
            out["zeros"] = self.zeros
        return out

    def dequantize(self):
        return dequantize(self)

    def to(self, device):
        return QuantizedTensor(self.scheme, self.shape, self.data.to(device), self.scales.to(device),
                               None if self.zeros is None else self.zeros.to(device), self.group_size)

    def state(self, prefix=""):
        """(tensors, metadata) under `prefix`, for safetensors files holding one or many tensors."""
        tensors = {prefix + k: v.detach().contiguous().cpu() for k, v in self.tensors().items()}
        meta = {prefix + "scheme": self.scheme, prefix + "shape": f"{self.shape[0]},{self.shape[1]}",
                prefix + "group_size": str(self.group_size), prefix + "crc32": str(_crc32(self.tensors()))}
        return tensors, meta

    @classmethod
    def from_state(cls, tensors, metadata, prefix="", where="QuantizedTensor"):
        """Inverse of state(); checks metadata, shapes, dtypes and the CRC, naming what is wrong."""
        def meta(key):
            if prefix + key not in metadata:
                raise ValueError(f"{where}: metadata key {prefix + key!r} is missing; not a quantized tensor file?")
            return metadata[prefix + key]
        scheme = meta("scheme")
        if scheme not in SCHEMES:
            raise ValueError(f"{where}: unknown scheme {scheme!r}; expected one of {SCHEMES}")
        try:
            shape = tuple(int(s) for s in meta("shape").split(","))
            group_size = int(meta("group_size"))
            crc = int(meta("crc32"))
        except ValueError:
            raise ValueError(f"{where}: malformed metadata (shape {metadata.get(prefix + 'shape')!r}, group_size "
                             f"{metadata.get(prefix + 'group_size')!r}, crc32 {metadata.get(prefix + 'crc32')!r})") from None
        if len(shape) != 2:
            raise ValueError(f"{where}: shape must be 'N,K', got {meta('shape')!r}")
        names = ("data", "scales", "zeros") if scheme == "int4" else ("data", "scales")
        for name in names:
            if prefix + name not in tensors:
                raise ValueError(f"{where}: tensor {prefix + name!r} is missing")
        qt = cls.__new__(cls)
        qt.scheme, qt.shape, qt.group_size = scheme, shape, group_size if scheme == "int4" else shape[1]
        qt.data, qt.scales = tensors[prefix + "data"], tensors[prefix + "scales"]
        qt.zeros = tensors.get(prefix + "zeros") if scheme == "int4" else None
        _validate(qt, where)
        if _crc32(qt.tensors()) != crc:
            raise ValueError(f"{where}: checksum mismatch, the quantized weights are corrupted")
        return qt

    def save(self, path, metadata=None):
        from safetensors.torch import save
        tensors, meta = self.state()
        extra = {f"user.{k}": str(v) for k, v in (metadata or {}).items()}
        atomic_write_bytes(path, save(tensors, metadata={"format": FORMAT, **meta, **extra}))
        return Path(path)

    @classmethod
    def load(cls, path):
        tensors, metadata = read_safetensors(path)
        if metadata.get("format") not in READ_FORMATS:
            raise ValueError(f"{path}: not a Quark quantized tensor (format {metadata.get('format')!r}, "
                             f"expected {FORMAT!r})")
        return cls.from_state(tensors, metadata, where=str(path))

    def __repr__(self):
        g = f", group_size={self.group_size}" if self.scheme == "int4" else ""
        return f"QuantizedTensor(scheme={self.scheme!r}, shape={self.shape}{g}, nbytes={self.nbytes})"

    def __getstate__(self):   # copies and pickles drop the kernels' handle (_packed rebuilds it)
        return {k: v for k, v in self.__dict__.items() if k != "_packed"}


def padded_k(K, group_size):
    """K rounded up to a whole number of int4 groups."""
    return -(-K // group_size) * group_size


def read_safetensors(path):
    """(tensors, metadata) of a safetensors file; a truncated or corrupted file raises ValueError."""
    from safetensors import SafetensorError, safe_open
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(f"{path} is corrupted or truncated (not a readable safetensors file: {e})") from None
    return tensors, metadata


def _crc32(tensors):
    crc = 0
    for name in sorted(tensors):
        crc = zlib.crc32(tensors[name].detach().contiguous().cpu().view(torch.uint8).numpy().tobytes(), crc)
    return crc


def _expect(where, name, t, dtype, shape):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{where}: {name} must be a torch tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise ValueError(f"{where}: {name} must have dtype {dtype}, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{where}: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def _validate(qt, where):
    if qt.scheme not in SCHEMES:
        raise ValueError(f"{where}: scheme must be one of {SCHEMES}, got {qt.scheme!r}")
    if len(qt.shape) != 2 or min(qt.shape) < 1:
        raise ValueError(f"{where}: shape must be (N, K) with N, K >= 1, got {qt.shape}")
    N, K = qt.shape
    if qt.scheme == "int4":
        G = qt.group_size
        if G not in GROUP_SIZES:
            raise ValueError(f"{where}: group_size must be one of {GROUP_SIZES}, got {G}")
        Kp = padded_k(K, G)
        _expect(where, "data", qt.data, torch.uint8, (N, Kp // 2))
        if isinstance(qt.scales, torch.Tensor) and qt.scales.dtype == torch.float32:
            raise ValueError(f"{where}: int4 scales must be bfloat16, got float32 (a quark.quantized_tensor/1 "
                             "layout; re-quantize the weights with this version)")
        _expect(where, "scales", qt.scales, torch.bfloat16, (N, Kp // G))
        _expect(where, "zeros", qt.zeros, torch.uint8, (N, Kp // G))
        if qt.zeros.numel() and int(qt.zeros.max()) > 15:
            raise ValueError(f"{where}: int4 zero points must be in [0, 15], got {int(qt.zeros.max())}")
    else:
        _expect(where, "data", qt.data, torch.int8, (N, K))
        _expect(where, "scales", qt.scales, torch.float32, (N,))
        if qt.zeros is not None:
            raise ValueError(f"{where}: {qt.scheme} has no zero points")
    if not bool(torch.isfinite(qt.scales).all()):
        raise ValueError(f"{where}: scales contain inf or NaN")


def _as_float_weight(w):
    if isinstance(w, np.ndarray):
        w = torch.from_numpy(w)
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"w must be a torch tensor or numpy array, got {type(w).__name__}")
    if not w.is_floating_point():
        raise TypeError(f"w must be a floating-point tensor, got {w.dtype}")
    if w.ndim != 2:
        raise ValueError(f"w must be 2-D (out_features, in_features), got shape {tuple(w.shape)}")
    if 0 in w.shape:
        raise ValueError(f"w must not be empty, got shape {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()):
        raise ValueError("w contains inf or NaN")
    return w.detach().to("cpu", torch.float32)


def _pack_int4(q):
    """q (N, K) values 0..15 -> (N, K/2) uint8; per block of 32, byte j = q[j] | q[j + 16] << 4."""
    N, K = q.shape
    blocks = q.to(torch.uint8).view(N, K // 32, 2, 16)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(N, K // 2).contiguous()


def _unpack_int4(data, K):
    N = data.shape[0]
    b = data.view(N, K // 32, 16)
    return torch.stack([b & 15, b >> 4], dim=2).reshape(N, K)


def quantize_rtn(w, scheme="int4", group_size=32):
    """Round-to-nearest quantization with a per-row (int8) / per-group (int4) clipping search."""
    w = _as_float_weight(w)
    N, K = w.shape
    if scheme in ("int8", "w8a8"):
        amax = w.abs().amax(dim=1, keepdim=True)                                   # (N, 1)
        best_q, best_s, best_err = None, None, None
        for shrink in _CLIP_SHRINK:
            s = torch.where(amax > 0, amax * shrink / 127, torch.ones_like(amax))
            q = torch.clamp(torch.round(w / s), -127, 127)
            err = ((q * s - w) ** 2).sum(dim=1, keepdim=True)
            if best_err is None:
                best_q, best_s, best_err = q, s, err
            else:
                better = err < best_err
                best_q = torch.where(better, q, best_q)
                best_s = torch.where(better, s, best_s)
                best_err = torch.minimum(err, best_err)
        return QuantizedTensor(scheme, (N, K), best_q.to(torch.int8).contiguous(),
                               best_s[:, 0].contiguous(), None, None)
    if scheme != "int4":
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {group_size!r}")
    Kp = padded_k(K, group_size)
    g = torch.nn.functional.pad(w, (0, Kp - K)).view(N, Kp // group_size, group_size)   # (N, G, g)
    lo = g.amin(dim=2, keepdim=True).clamp(max=0)                                # 0 stays representable
    hi = g.amax(dim=2, keepdim=True).clamp(min=0)
    best = None
    for shrink in _CLIP_SHRINK:
        s = ((hi - lo) * shrink / 15).to(torch.bfloat16).float()    # the scale as stored
        s = torch.where(s > 0, s, torch.ones_like(s))
        z = torch.clamp(torch.round(-lo * shrink / s), 0, 15)
        q = torch.clamp(torch.round(g / s) + z, 0, 15)
        err = (((q - z) * s - g) ** 2).sum(dim=2, keepdim=True)
        if best is None:
            best = [q, s, z, err]
        else:
            better = err < best[3]
            best = [torch.where(better, q, best[0]), torch.where(better, s, best[1]),
                    torch.where(better, z, best[2]), torch.minimum(err, best[3])]
    q, s, z, _ = best
    return QuantizedTensor("int4", (N, K), _pack_int4(q.reshape(N, Kp)), s[..., 0].to(torch.bfloat16).contiguous(),
                           z[..., 0].to(torch.uint8).contiguous(), group_size)


def quantize(w, scheme="int4", group_size=32):
    """Quantize weights w (N, K) -> QuantizedTensor. See the module docstring for the schemes."""
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    return quantize_rtn(w, scheme, group_size)


def dequantize(qt):
    """QuantizedTensor -> float32 weights (N, K), on the device of qt."""
    if not isinstance(qt, QuantizedTensor):
        raise TypeError(f"qt must be a QuantizedTensor, got {type(qt).__name__}")
    if qt.scheme == "int4":
        N, K = qt.shape
        Kp = qt.packed_k
        q = _unpack_int4(qt.data, Kp).view(N, Kp // qt.group_size, qt.group_size).float()
        return ((q - qt.zeros.float()[..., None]) * qt.scales.float()[..., None]).reshape(N, Kp)[:, :K]
    return qt.data.float() * qt.scales[:, None]


def quantize_activations(x):
    """Per-row symmetric int8 of x (M, K) float32, as the W8A8 path does: (q int8, scale (M,) float32)."""
    amax = x.abs().amax(dim=1)
    # rows whose 127 / amax would overflow (amax < ~3.7e-37) are scaled by 2^100 first, exactly
    tiny = (amax > 0) & (amax < 127.0 / torch.finfo(torch.float32).max)
    pre = torch.where(tiny, torch.full_like(amax, 2.0**100), torch.ones_like(amax))
    # tensor / tensor: torch computes `127.0 / t` as reciprocal(t) * 127, which rounds differently from
    # the kernel's 127.f / amax and flips the odd exact tie (107.5 -> 107 vs 108).
    safe = torch.where(amax > 0, amax * pre, torch.ones_like(amax))
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / safe, torch.zeros_like(amax))
    return torch.round(x * pre[:, None] * inv[:, None]).to(torch.int8), amax / torch.full_like(amax, 127.0)


def pad_to_packed(x, qt):
    """x (..., K) zero-padded to (..., qt.packed_k), the K the kernels see; x itself when not padded."""
    pad = qt.packed_k - qt.shape[1]
    return torch.nn.functional.pad(x, (0, pad)) if pad else x


def _packed(qt):
    """qt's CPU arrays as the C++ kernels take them (_C.PackedWeight: checked and imported once, ~10 us
    a call saved cold), cached on qt and rebuilt when one of its tensors is replaced. In-place updates
    need nothing: the handle points at the tensors' memory."""
    p = qt.__dict__.get("_packed")
    if p is None or p[1] is not qt.data or p[2] is not qt.scales or p[3] is not qt.zeros:
        p = (_C.PackedWeight(qt.scheme, qt.data, qt.scales, qt.zeros, qt.group_size), qt.data, qt.scales, qt.zeros)
        qt.__dict__["_packed"] = p
    return p[0]


def _run_kernel(x2, qt, bias, out, bf16_compute=False):
    """The C++ kernel for x2 (..., packed_k) into out (..., N), each fp32 or bf16; the binding checks
    every argument. The tensors go as DLPack capsules: torch's Tensor.__dlpack__, which nanobind calls
    otherwise, is Python code that costs ~45 us cold against ~14 us for to_dlpack (a decode step's
    GEMV runs cold). to_dlpack ignores a negative-view bit, so callers pass none (is_neg())."""
    _C.qlinear(to_dlpack(x2), _packed(qt), None if bias is None else to_dlpack(bias), to_dlpack(out), bf16_compute)


def qlinear(x, qt, bias=None):
    """x (..., K) float32 or bfloat16 -> (..., N) in x's dtype: x @ dequantize(qt).T + bias.

    numpy in -> numpy out. CPU runs the C++ kernels, CUDA the Triton kernels (quark.ops.triton.qmatmul);
    other devices use quark.ops.reference.qlinear.
    bf16 x is widened to fp32 for the kernel and the result rounded back to bf16; int4 weights may be
    rounded to bf16 as well (amx GEMM, M > 5: see the module docstring).
    """
    # Fast path, a decode step's case: fp32 CPU x (..., K) and bias, weights packed at x's width. Each
    # check costs microseconds here (the previous layer's GEMV has just evicted the interpreter's working
    # set from the caches), so the binding's own checks (dtype, device, layout, shapes) do the work, and
    # whatever they refuse takes the general path, which handles it or raises a clear error.
    if (type(x) is torch.Tensor and (x.dtype is torch.float32 or x.dtype is torch.bfloat16) and not x.is_neg()
            and type(qt) is QuantizedTensor
            and (bias is None or type(bias) is torch.Tensor and bias.dtype is torch.float32 and not bias.is_neg())):
        try:
            out = torch.empty((*x.shape[:-1], qt.shape[0]), dtype=x.dtype)
            _run_kernel(x, qt, bias, out, bf16_compute=x.dtype is torch.bfloat16)
            return out
        except (TypeError, ValueError, RuntimeError):   # RuntimeError: to_dlpack of a non-strided tensor
            pass
    if not isinstance(qt, QuantizedTensor):
        raise TypeError(f"qt must be a QuantizedTensor, got {type(qt).__name__}")
    was_numpy = isinstance(x, np.ndarray)
    check_array("x", x, ("float32", "bfloat16"))
    xt = torch.from_numpy(x) if was_numpy else x
    N, K = qt.shape
    if xt.ndim == 0 or xt.shape[-1] != K:
        raise ValueError(f"x must have last dimension K={K} (qt has shape {qt.shape}), got shape {tuple(xt.shape)}")
    if bias is not None:
        if isinstance(bias, np.ndarray):
            bias = torch.from_numpy(bias)
        if not isinstance(bias, torch.Tensor) or not bias.is_floating_point() or tuple(bias.shape) != (N,):
            raise ValueError(f"bias must be a floating-point tensor of shape ({N},), got "
                             f"{getattr(bias, 'shape', type(bias).__name__)}")
    if device_of(xt) == "cuda" and qt.data.device.type == "cuda" and triton_ops.available():
        from quark.ops.triton.qmatmul import qmatmul
        if qt.scheme == "w8a8":                    # the same activation rounding as the CPU kernels
            q, s = quantize_activations(xt.reshape(-1, K).float())
            xt = (q.float() * s[:, None]).to(xt.dtype).reshape(xt.shape)
        return qmatmul(pad_to_packed(xt, qt), "int4" if qt.scheme == "int4" else "int8", qt.data, qt.scales,
                       qt.zeros, qt.group_size, bias)
    if device_of(xt) != "cpu" or qt.data.device.type != "cpu":
        from quark.ops import reference
        return reference.qlinear(xt, qt, bias)
    # As few torch ops as possible around the kernel, none after it: a GEMV streams megabytes through L2
    # and evicts the interpreter's and torch's working set, so each op after it runs cold (~25 us for
    # the first, measured; a few us when warm). The kernels read and write bf16 themselves.
    x2 = pad_to_packed(xt.resolve_neg().contiguous(), qt)
    b = None if bias is None else bias.detach().resolve_neg().to(torch.float32).contiguous()
    out = torch.empty((*xt.shape[:-1], N), dtype=xt.dtype)
    _run_kernel(x2, qt, b, out, bf16_compute=xt.dtype == torch.bfloat16)
    return out.numpy() if was_numpy else out
